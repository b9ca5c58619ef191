//! zt: a zero-trust host firewall. This library holds everything the two binaries share:
//! the policy compiler ([`policy`]), the loader that keeps the kernel programs attached and
//! pinned ([`loader`]), the daemon ([`daemon`]) and its control protocol ([`control`]).

pub mod btf;
pub mod control;
pub mod daemon;
pub mod events;
pub mod loader;
pub mod policy;
pub mod sys;
pub mod xdp;

// The event pipeline: history and filters, enrichment, metrics.
pub mod enrich;
pub mod history;
pub mod metrics;
pub mod notice;

// Identities that follow the system: executables replaced, unit cgroups recreated.
pub mod identity_watch;
