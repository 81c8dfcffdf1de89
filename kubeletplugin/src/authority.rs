//! Accepting any HTTP/2 `:authority` on the plugin's gRPC sockets.
//!
//! # Why this exists
//! The kubelet's plugin watcher dials the registration socket by its bare path
//! (`pkg/kubelet/pluginmanager/operationexecutor/operation_generator.go`, `dial()`), and grpc-go
//! then sends the socket path as the HTTP/2 `:authority`: percent-encoded by `encodeAuthority`
//! (`%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2F...`), or raw (`/var/lib/...`) from older
//! grpc-go. Other clients send an empty authority. The plugin's servers run on tonic, hyper and
//! h2, and h2 resets every stream whose `:authority` does not parse as an
//! [`http::uri::Authority`] (`src/server.rs`, `convert_poll_message`: "malformed headers:
//! malformed authority", RST_STREAM PROTOCOL_ERROR). So the real kubelet could not call
//! `GetInfo` and never registered the plugin. Known upstream: hyperium/h2 PR #487 (accept such
//! authorities; not merged), grpc/grpc-rust (tonic) issues #243 and #1876 (a Rust CSI driver
//! failing the kubelet's registration the same way), kubernetes PR #112597 (the kubelet sends
//! `localhost` for CSI and CRI clients, but not for the plugin-registration dial). Neither tonic
//! nor hyper offers a setting for it.
//!
//! # What it does
//! [`AuthorityShim`] wraps each accepted connection before tonic sees it. In the client-to-server
//! direction it reads the HTTP/2 frames after the 24-byte connection preface. Every header block
//! (a HEADERS frame and its CONTINUATION frames; PADDED and PRIORITY are honoured) is decoded with
//! `loona-hpack`, whose decoder keeps the client's dynamic table; an `:authority` that
//! [`http::uri::Authority`] rejects is replaced with `localhost`; and the block is encoded again,
//! every field as a literal *without indexing*, and split into HEADERS and CONTINUATION frames of
//! at most 16,384 bytes (the smallest SETTINGS_MAX_FRAME_SIZE, which the servers keep). Every
//! block is re-encoded, not only the changed ones: the server's HPACK decoder then never needs the
//! client's dynamic table (its own stays empty), so the two cannot disagree. Every other frame
//! passes byte for byte, and the server-to-client direction is not touched at all.
//!
//! A header block is capped at [`MAX_HEADER_BLOCK`] bytes, encoded and decoded; a larger block, a
//! malformed frame sequence or an HPACK error closes the connection (the read fails with
//! [`std::io::ErrorKind::InvalidData`]), which is what h2 does with such input as well. A
//! rewrite is logged once per connection at debug level.
//!
//! The decoder's dynamic table is limited to 4,096 bytes, the HTTP/2 default of
//! SETTINGS_HEADER_TABLE_SIZE: the servers announce no other value, so a client may not use a
//! larger table. Should the servers ever announce a larger one, `HEADER_TABLE_SIZE` here must
//! follow. A larger SETTINGS_MAX_FRAME_SIZE needs nothing: 16,384 bytes are always allowed.
//!
//! # When it can go
//! When h2 accepts such authorities (PR #487 or an equivalent), or the kubelet sends `localhost`
//! for the registration dial too and every supported kubelet does so: then `Side::spawn` in
//! [`crate::server`] serves the plain `UnixStream` again and this module is deleted. A client of
//! another gRPC stack that sends these authorities (Python grpcio can, tonic cannot) shows
//! whether it is still needed: it fails without the shim for as long as h2 refuses them.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use loona_hpack::Decoder;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header length.
const FRAME_HEADER: usize = 9;
/// The largest frame payload the shim writes: the initial SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME_PAYLOAD: usize = 16_384;
/// The largest header block (encoded, all fragments together; and decoded, counted as HPACK
/// header list size: name + value + 32 per field) the shim accepts.
pub const MAX_HEADER_BLOCK: usize = 256 * 1024;
/// The HPACK dynamic table size the servers allow (the HTTP/2 default).
const HEADER_TABLE_SIZE: usize = 4_096;
/// What a refused authority becomes.
const REPLACEMENT: &[u8] = b"localhost";

const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

/// Why the shim closed a connection.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ShimError {
    /// The frames break an HTTP/2 rule the shim depends on.
    #[error("malformed HTTP/2 frames: {0}")]
    Malformed(&'static str),
    /// A header block exceeds [`MAX_HEADER_BLOCK`].
    #[error("header block larger than {MAX_HEADER_BLOCK} bytes")]
    TooLarge,
    /// The header block is not valid HPACK.
    #[error("HPACK error: {0}")]
    Hpack(#[from] loona_hpack::decoder::DecoderError),
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Matching the connection preface; `seen` bytes matched so far.
    Preface { seen: usize },
    /// Collecting a frame header into `pending`.
    FrameHeader,
    /// Forwarding `remaining` payload bytes of a frame that is passed through.
    Passthrough { remaining: usize },
    /// Collecting the payload of a HEADERS or CONTINUATION frame into `pending`.
    HeaderPayload {
        kind: u8,
        flags: u8,
        stream: u32,
        length: usize,
    },
    /// Not HTTP/2 (no preface): everything passes; the server refuses it itself.
    Opaque,
}

/// A header block whose END_HEADERS has not been seen yet.
#[derive(Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The client-to-server half of the shim, without I/O: bytes in, bytes out.
pub struct Rewriter {
    state: State,
    pending: Vec<u8>,
    block: Option<OpenBlock>,
    decoder: Decoder<'static>,
    logged: bool,
}

impl std::fmt::Debug for Rewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewriter")
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .field("block", &self.block.as_ref().map(|b| b.stream))
            .finish_non_exhaustive()
    }
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    /// A rewriter at the start of a connection.
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Self {
            state: State::Preface { seen: 0 },
            pending: Vec::new(),
            block: None,
            decoder,
            logged: false,
        }
    }

    /// Consumes `input` (any split of the client's byte stream) and appends what the server
    /// should read to `out`. After an error the connection must be closed.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) -> Result<(), ShimError> {
        while !input.is_empty() {
            match self.state {
                State::Opaque => {
                    out.extend_from_slice(input);
                    input = &[];
                }
                State::Preface { seen } => {
                    let n = input.len().min(PREFACE.len() - seen);
                    let (head, rest) = input.split_at(n);
                    out.extend_from_slice(head);
                    input = rest;
                    self.state = if PREFACE.get(seen..seen + n) != Some(head) {
                        State::Opaque
                    } else if seen + n == PREFACE.len() {
                        State::FrameHeader
                    } else {
                        State::Preface { seen: seen + n }
                    };
                }
                State::FrameHeader => {
                    input = self.fill(input, FRAME_HEADER);
                    if self.pending.len() == FRAME_HEADER {
                        self.frame_header(out)?;
                    }
                }
                State::Passthrough { remaining } => {
                    let n = input.len().min(remaining);
                    let (head, rest) = input.split_at(n);
                    out.extend_from_slice(head);
                    input = rest;
                    self.state = if n == remaining {
                        State::FrameHeader
                    } else {
                        State::Passthrough {
                            remaining: remaining - n,
                        }
                    };
                }
                State::HeaderPayload {
                    kind,
                    flags,
                    stream,
                    length,
                } => {
                    input = self.fill(input, length);
                    if self.pending.len() == length {
                        self.header_payload(kind, flags, stream, out)?;
                    }
                }
            }
        }
        // A frame without payload is complete as soon as its header is.
        if let State::HeaderPayload {
            kind,
            flags,
            stream,
            length: 0,
        } = self.state
        {
            self.header_payload(kind, flags, stream, out)?;
        }
        Ok(())
    }

    /// Moves bytes from `input` into `pending` until it holds `want` bytes; returns the rest.
    fn fill<'a>(&mut self, input: &'a [u8], want: usize) -> &'a [u8] {
        let n = input.len().min(want.saturating_sub(self.pending.len()));
        let (head, rest) = input.split_at(n);
        self.pending.extend_from_slice(head);
        rest
    }

    /// Acts on the complete frame header in `pending`.
    fn frame_header(&mut self, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let h = &self.pending;
        let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
        if let Some(block) = &self.block
            && (kind != TYPE_CONTINUATION || stream != block.stream)
        {
            return Err(ShimError::Malformed(
                "a header block is interrupted by another frame",
            ));
        }
        match kind {
            TYPE_HEADERS | TYPE_CONTINUATION => {
                if kind == TYPE_CONTINUATION && self.block.is_none() {
                    return Err(ShimError::Malformed("CONTINUATION without HEADERS"));
                }
                if stream == 0 {
                    return Err(ShimError::Malformed("header block on stream 0"));
                }
                let collected = self.block.as_ref().map_or(0, |b| b.fragment.len());
                if collected + length > MAX_HEADER_BLOCK {
                    return Err(ShimError::TooLarge);
                }
                self.pending.clear();
                self.state = State::HeaderPayload {
                    kind,
                    flags,
                    stream,
                    length,
                };
            }
            // Only servers push (RFC 9113 §8.4); its header block would change the HPACK state.
            TYPE_PUSH_PROMISE => return Err(ShimError::Malformed("PUSH_PROMISE from a client")),
            _ => {
                out.extend_from_slice(&self.pending);
                self.pending.clear();
                self.state = if length == 0 {
                    State::FrameHeader
                } else {
                    State::Passthrough { remaining: length }
                };
            }
        }
        Ok(())
    }

    /// Acts on the complete payload of a HEADERS or CONTINUATION frame in `pending`.
    fn header_payload(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), ShimError> {
        let payload = std::mem::take(&mut self.pending);
        self.state = State::FrameHeader;
        if kind == TYPE_HEADERS {
            let mut start = 0;
            let mut end = payload.len();
            if flags & FLAG_PADDED != 0 {
                let pad = usize::from(
                    *payload
                        .first()
                        .ok_or(ShimError::Malformed("PADDED HEADERS without a pad length"))?,
                );
                start = 1;
                end = end
                    .checked_sub(pad)
                    .filter(|&end| end >= start)
                    .ok_or(ShimError::Malformed("padding longer than the frame"))?;
            }
            let priority = if flags & FLAG_PRIORITY != 0 {
                let fields: [u8; 5] = payload
                    .get(start..start + 5)
                    .filter(|_| start + 5 <= end)
                    .and_then(|s| s.try_into().ok())
                    .ok_or(ShimError::Malformed("PRIORITY fields missing"))?;
                start += 5;
                Some(fields)
            } else {
                None
            };
            self.block = Some(OpenBlock {
                stream,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: payload[start..end].to_vec(),
            });
        } else if let Some(block) = &mut self.block {
            block.fragment.extend_from_slice(&payload);
        }
        if flags & FLAG_END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.finish_block(block, out)?;
        }
        Ok(())
    }

    /// Decodes a complete header block, rewrites the authority and writes the new frames.
    fn finish_block(&mut self, block: OpenBlock, out: &mut Vec<u8>) -> Result<(), ShimError> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_HEADER_BLOCK {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })?;
        if size > MAX_HEADER_BLOCK {
            return Err(ShimError::TooLarge);
        }
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                if !self.logged {
                    self.logged = true;
                    tracing::debug!(
                        authority = %String::from_utf8_lossy(value),
                        "rewriting an HTTP/2 :authority the server would refuse to localhost \
                         (logged once per connection)"
                    );
                }
                *value = REPLACEMENT.to_vec();
            }
        }
        let encoded = encode_without_indexing(&fields);
        write_header_frames(&block, &encoded, out);
        Ok(())
    }
}

/// HPACK-encodes `fields` as literals without indexing, with literal names and raw strings
/// (RFC 7541 §6.2.2): the decoder's dynamic table is never touched.
fn encode_without_indexing(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|(n, v)| n.len() + v.len() + 8).sum());
    for (name, value) in fields {
        out.push(0x00);
        for string in [name, value] {
            // Writing into a Vec cannot fail.
            let _ = loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, &mut out);
            out.extend_from_slice(string);
        }
    }
    out
}

/// Writes `encoded` as a HEADERS frame (with the block's END_STREAM and PRIORITY) followed by
/// CONTINUATION frames, each payload at most [`MAX_FRAME_PAYLOAD`] bytes.
fn write_header_frames(block: &OpenBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| p.as_slice());
    let first = encoded.len().min(MAX_FRAME_PAYLOAD - priority.len());
    let (head, mut rest) = encoded.split_at(first);
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    if block.priority.is_some() {
        flags |= FLAG_PRIORITY;
    }
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    frame_header(
        out,
        priority.len() + head.len(),
        TYPE_HEADERS,
        flags,
        block.stream,
    );
    out.extend_from_slice(priority);
    out.extend_from_slice(head);
    while !rest.is_empty() {
        let n = rest.len().min(MAX_FRAME_PAYLOAD);
        let (chunk, tail) = rest.split_at(n);
        let flags = if tail.is_empty() { FLAG_END_HEADERS } else { 0 };
        frame_header(out, chunk.len(), TYPE_CONTINUATION, flags, block.stream);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

fn frame_header(out: &mut Vec<u8>, length: usize, kind: u8, flags: u8, stream: u32) {
    // Lengths here are at most MAX_FRAME_PAYLOAD, which fits 24 bits.
    let length = length.to_be_bytes();
    out.extend_from_slice(&length[length.len() - 3..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// An accepted connection whose client-to-server bytes go through a [`Rewriter`]; writes pass
/// straight to the inner stream.
#[derive(Debug)]
pub struct AuthorityShim<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet handed to the reader, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    buf: Box<[u8]>,
    eof: bool,
    failed: Option<ShimError>,
}

impl<S> AuthorityShim<S> {
    /// Wraps a freshly accepted connection.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            buf: vec![0; 16 * 1024].into_boxed_slice(),
            eof: false,
            failed: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityShim<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(error) = &this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    error.to_string(),
                )));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let mut read = ReadBuf::new(&mut this.buf);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let filled = read.filled();
            if filled.is_empty() {
                // An incomplete frame at the end is dropped: the server sees the connection end.
                this.eof = true;
                continue;
            }
            if let Err(error) = this.rewriter.feed(filled, &mut this.out) {
                tracing::warn!(%error, "closing a gRPC connection");
                // What was rewritten before the error is still delivered, then the error.
                this.failed = Some(error);
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityShim<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AuthorityShim<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests;
