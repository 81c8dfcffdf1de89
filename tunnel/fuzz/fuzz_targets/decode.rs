//! Fuzzes the datagram decoder with arbitrary bytes: it must never panic, must reject or
//! accept the datagram as a whole, and whatever it accepts must re-encode to the same bytes
//! (apart from the sequence number, which the encoder chooses).
#![no_main]

use can_dra_tunnel::codec::{Encoder, MIN_DATAGRAM_LEN, decode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frames = Vec::new();
    match decode(data, &mut frames) {
        Ok(header) => {
            assert_eq!(usize::from(header.count), frames.len());
            if frames.is_empty() {
                return;
            }
            // One datagram of the same size can carry them all again, byte for byte.
            let limit = data.len().max(MIN_DATAGRAM_LEN);
            let mut encoder = Encoder::new(limit).expect("limit is at least the minimum");
            let mut out = Vec::new();
            let taken = encoder.encode_one(&frames, &mut out);
            assert_eq!(taken, frames.len());
            assert_eq!(&out[..2], &data[..2]);
            assert_eq!(&out[3..], &data[3..]);
        }
        Err(_) => assert!(frames.is_empty()),
    }
});
