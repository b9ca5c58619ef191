//! zt: a zero-trust host firewall. This library holds everything the two binaries share:
//! the policy compiler ([`policy`]), the loader that keeps the kernel programs attached and
//! pinned ([`loader`]), the daemon ([`daemon`]) and its control protocol ([`control`]).

pub mod btf;
pub mod control;
pub mod daemon;
pub mod events;
pub mod loader;
pub mod policy;
pub mod support;
pub mod sys;
pub mod trust;
pub mod xdp;

// The event pipeline: history and filters, enrichment, metrics.
pub mod enrich;
pub mod history;
pub mod metrics;

// Learning mode: the persistent flow store, `ztctl suggest` and `ztctl diff`.
pub mod flows;
pub mod learn;
// Installing and running as a service: the configuration file, systemd readiness, the
// events file, man pages and completions.
pub mod config;
pub mod events_file;
pub mod manual;
pub mod notice;
pub mod notify;

// Identities that follow the system: executables replaced, unit cgroups recreated.
pub mod identity_watch;
