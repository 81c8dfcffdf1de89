//! `can-dra-deploy` owns the installation artefacts of can-dra: the Helm chart in `helm/can-dra/`, the
//! plain manifests in `manifests/can-dra.yaml` rendered from it, the container build in `Dockerfile`
//! and (next door) the kind demo in `demo/kind/`.
//!
//! The library is the offline half of `helm template`: it renders the chart with the subset of the
//! Go template language the chart uses (the Go built-ins plus Helm's `quote`, `indent` and
//! `nindent`), so that the plain manifests are generated from the chart rather than kept by hand,
//! and the tests in `tests/` can check every rendered object without a cluster or a `helm` binary.
//!
//! ```
//! use can_dra_deploy::{chart_dir, render_chart, Release};
//!
//! let docs = render_chart(&chart_dir(), &Release::default(), None)?;
//! assert!(docs.iter().any(|d| d.kind() == Some("DaemonSet".to_owned())));
//! # Ok::<(), can_dra_deploy::RenderError>(())
//! ```

mod chart;
mod documents;

pub use chart::{Release, RenderError, chart_dir, plain_manifests, render_chart};
pub use documents::{Document, split_documents};
