//! Prometheus metrics of `ztd`: a [`MetricsSnapshot`] of the daemon's counters, rendered in
//! the Prometheus text exposition format 0.0.4 ([`render`]) and served over HTTP at
//! `GET /metrics` ([`serve`], [`MetricsServer`]).
//!
//! Every metric name starts with `zt_`. Counters come from the kernel's per-CPU statistics
//! and the daemon's event [`crate::history::History`]; they restart from 0 only when their
//! source does (a new `ztd` counts events from 0; kernel counters live in pinned maps).
//!
//! Loss accounting (see [`crate::history`]): at any scrape,
//! `zt_events_total{stage="produced"} == zt_events_total{stage="delivered"} +
//! zt_events_lost_total{stage="kernel"} + zt_events_lost_total{stage="daemon"}`, up to the
//! events still in the ring buffer (`zt_ring_buffer_fill_bytes` worth).

use std::{convert::Infallible, future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    header::{HeaderValue, ALLOW, CONTENT_TYPE},
    server::conn::http1,
    service::service_fn,
    Method, Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use tokio::{net::TcpListener, task::JoinSet};

/// Content type of the text exposition format served at `/metrics`.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Most scrape connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/metrics` shows: a copy of the daemon's counters, taken at each scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// Kernel decisions: `(verdict, hook, count)`, e.g. `("deny", "connect4", 3)`.
    /// → `zt_decisions_total{verdict,hook}`.
    pub decisions: Vec<(String, String, u64)>,
    /// Hits per rule of the active generation: `(rule id, "path:line:column" or "default",
    /// count)`. → `zt_rule_hits_total{rule_id,location}`.
    pub rule_hits: Vec<(u32, String, u64)>,
    /// Events the kernel tried to submit (sent + lost), cgroup hooks and XDP together.
    /// → `zt_events_total{stage="produced"}`.
    pub events_produced: u64,
    /// Events read from the ring buffer and kept. → `zt_events_total{stage="delivered"}`.
    pub events_delivered: u64,
    /// Events lost because the ring buffer was full. → `zt_events_lost_total{stage="kernel"}`.
    pub events_lost_kernel: u64,
    /// Events read but not kept (malformed). → `zt_events_lost_total{stage="daemon"}`.
    pub events_lost_daemon: u64,
    /// Events aged out of the bounded history (not loss).
    /// → `zt_history_evicted_total`.
    pub events_evicted: u64,
    /// Events the kernel rate-limited and never submitted (sum of the records' `suppressed`;
    /// not loss, not in `events_produced`). → `zt_events_suppressed_total`.
    pub events_suppressed: u64,
    /// Events live followers (`ztctl events --follow`) fell behind on, summed (not loss).
    /// → `zt_follower_missed_total`.
    pub follower_missed: u64,
    /// Events in the history now. → `zt_history_events`.
    pub history_events: u64,
    /// Live followers now. → `zt_followers`.
    pub followers: u64,
    /// Bytes waiting in the event ring buffer. → `zt_ring_buffer_fill_bytes`.
    pub ring_fill_bytes: u64,
    /// Size of the event ring buffer. → `zt_ring_buffer_size_bytes`.
    pub ring_size_bytes: u64,
    /// Kernel error paths: `(kind, count)`, e.g. `("no_policy", 0)`, `("exe_unreadable", 2)`,
    /// `("rule_unknown", 0)`, `("skb_unparsed", 0)`. → `zt_kernel_errors_total{kind}`.
    pub kernel_errors: Vec<(String, u64)>,
    /// Packets the `cgroup_skb` hooks dropped, by reason: `("unparsed", n)` (headers zt could
    /// not parse to the end), `("backstop", n)` (the backstop's verdict).
    /// → `zt_drops_total{reason}`.
    pub drops: Vec<(String, u64)>,
    /// XDP front door: `(interface, outcome, packets)`, outcome e.g. `passed`,
    /// `dropped_deny_list`, `dropped_closed_port`, `dropped_malformed`, `audited`.
    /// → `zt_xdp_packets_total{interface,outcome}`.
    pub xdp_packets: Vec<(String, String, u64)>,
    /// Active policy generation. → `zt_policy_generation`.
    pub generation: u64,
    /// Every expected program attached. → `zt_healthy` (1 or 0).
    pub healthy: bool,
    /// Seconds since the Unix epoch of the last load or reload attempt.
    /// → `zt_last_reload_timestamp_seconds`.
    pub last_reload_time: u64,
    /// Whether that attempt succeeded. → `zt_last_reload_success` (1 or 0).
    pub last_reload_ok: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Shorthand for the snapshot callback of [`serve`].
pub type SnapshotFn = Arc<dyn Fn() -> MetricsSnapshot + Send + Sync>;

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, prometheus::Error> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str, value: u64) -> Result<(), prometheus::Error> {
    let g = IntGauge::with_opts(Opts::new(name, help))?;
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    registry.register(Box::new(g))
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), prometheus::Error> {
    let c = IntCounter::with_opts(Opts::new(name, help))?;
    c.inc_by(value);
    registry.register(Box::new(c))
}

fn build(s: &MetricsSnapshot) -> Result<String, prometheus::Error> {
    let r = Registry::new();

    let decisions = counter_vec(
        &r,
        "zt_decisions_total",
        "Decisions made by the kernel programs, by verdict and hook.",
        &["verdict", "hook"],
    )?;
    for (verdict, hook, n) in &s.decisions {
        decisions.with_label_values(&[verdict, hook]).inc_by(*n);
    }

    let rules = counter_vec(
        &r,
        "zt_rule_hits_total",
        "Decisions per rule of the active policy generation (rule_id 0: the default verdict).",
        &["rule_id", "location"],
    )?;
    for (id, location, n) in &s.rule_hits {
        rules
            .with_label_values(&[id.to_string().as_str(), location])
            .inc_by(*n);
    }

    let events = counter_vec(
        &r,
        "zt_events_total",
        "Decision events produced by the kernel and delivered to (read and kept by) ztd.",
        &["stage"],
    )?;
    events
        .with_label_values(&["produced"])
        .inc_by(s.events_produced);
    events
        .with_label_values(&["delivered"])
        .inc_by(s.events_delivered);

    let lost = counter_vec(
        &r,
        "zt_events_lost_total",
        "Decision events lost: the ring buffer was full (kernel), or a record could not be \
         used (daemon). produced = delivered + lost{kernel} + lost{daemon} + in flight.",
        &["stage"],
    )?;
    lost.with_label_values(&["kernel"])
        .inc_by(s.events_lost_kernel);
    lost.with_label_values(&["daemon"])
        .inc_by(s.events_lost_daemon);

    counter(
        &r,
        "zt_history_evicted_total",
        "Events aged out of ztd's bounded history to make room (not lost).",
        s.events_evicted,
    )?;
    counter(
        &r,
        "zt_events_suppressed_total",
        "Events the kernel rate limiter did not submit, reported in the next event of the \
         same flow (not lost, not produced).",
        s.events_suppressed,
    )?;
    counter(
        &r,
        "zt_follower_missed_total",
        "Events live followers (ztctl events --follow) fell behind on and were told they \
         missed (not lost: they are in the history).",
        s.follower_missed,
    )?;

    let errors = counter_vec(
        &r,
        "zt_kernel_errors_total",
        "Error paths taken by the kernel programs, by kind.",
        &["kind"],
    )?;
    for (kind, n) in &s.kernel_errors {
        errors.with_label_values(&[kind]).inc_by(*n);
    }

    let drops = counter_vec(
        &r,
        "zt_drops_total",
        "Packets dropped by the cgroup_skb hooks, by reason (unparsed: headers zt could not \
         parse to the end; backstop: the backstop's verdict).",
        &["reason"],
    )?;
    for (reason, n) in &s.drops {
        drops.with_label_values(&[reason]).inc_by(*n);
    }

    let xdp = counter_vec(
        &r,
        "zt_xdp_packets_total",
        "Packets seen by the XDP front door, by interface and outcome.",
        &["interface", "outcome"],
    )?;
    for (iface, outcome, n) in &s.xdp_packets {
        xdp.with_label_values(&[iface, outcome]).inc_by(*n);
    }

    gauge(
        &r,
        "zt_history_events",
        "Events held in ztd's history now.",
        s.history_events,
    )?;
    gauge(&r, "zt_followers", "Live event followers now.", s.followers)?;
    gauge(
        &r,
        "zt_ring_buffer_fill_bytes",
        "Bytes of events that were waiting in the kernel ring buffer when the kernel last sent an event.",
        s.ring_fill_bytes,
    )?;
    gauge(
        &r,
        "zt_ring_buffer_size_bytes",
        "Size of the kernel event ring buffer.",
        s.ring_size_bytes,
    )?;
    gauge(
        &r,
        "zt_policy_generation",
        "Generation of the policy in force.",
        s.generation,
    )?;
    gauge(
        &r,
        "zt_healthy",
        "1 if every expected program is attached, else 0.",
        u64::from(s.healthy),
    )?;
    gauge(
        &r,
        "zt_last_reload_timestamp_seconds",
        "When the policy was last loaded or reloaded (Unix seconds), successfully or not.",
        s.last_reload_time,
    )?;
    gauge(
        &r,
        "zt_last_reload_success",
        "1 if the last policy load or reload succeeded, else 0.",
        u64::from(s.last_reload_ok),
    )?;

    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// The snapshot in the Prometheus text exposition format 0.0.4 (`# HELP`, `# TYPE`, samples).
/// A label family with no entries in the snapshot is left out.
pub fn render(snapshot: &MetricsSnapshot) -> String {
    // Errors here are programming errors (an invalid name, a label count mismatch): the
    // tests render every family.
    build(snapshot).unwrap_or_else(|e| format!("# zt: cannot encode metrics: {e}\n"))
}

/// A bound `/metrics` listener; [`MetricsServer::run`] serves it.
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Listen on `addr` (port 0: any free port, see [`MetricsServer::local_addr`]).
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(MetricsServer { listener })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, MetricsError> {
        Ok(self.listener.local_addr()?)
    }

    /// Serve `GET /metrics` (and `HEAD`) with a fresh [`render`] of `snapshot()` per
    /// request, 405 for other methods there, 404 elsewhere, until `shutdown` completes;
    /// then stop accepting and close open connections. HTTP/1.1 with keep-alive, at most
    /// [`MAX_CONNECTIONS`] at once, [`HEADER_TIMEOUT`] to send a request.
    pub async fn run(
        self,
        snapshot: SnapshotFn,
        shutdown: impl Future,
    ) -> Result<(), MetricsError> {
        tokio::pin!(shutdown);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = self.listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => {
                            // Out of file descriptors and the like: let it pass.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    if connections.len() >= MAX_CONNECTIONS {
                        drop(stream);
                        continue;
                    }
                    let snapshot = Arc::clone(&snapshot);
                    connections.spawn(async move {
                        let service = service_fn(move |req| {
                            let snapshot = Arc::clone(&snapshot);
                            async move { Ok::<_, Infallible>(respond(&req, &snapshot)) }
                        });
                        let _ = http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        }
        connections.shutdown().await;
        Ok(())
    }
}

/// Listen on `addr` and serve `/metrics` until `shutdown` completes
/// ([`MetricsServer::bind`] then [`MetricsServer::run`]).
pub async fn serve(
    addr: SocketAddr,
    snapshot: SnapshotFn,
    shutdown: impl Future,
) -> Result<(), MetricsError> {
    MetricsServer::bind(addr)
        .await?
        .run(snapshot, shutdown)
        .await
}

fn respond(req: &Request<Incoming>, snapshot: &SnapshotFn) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    if req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "not found: try /metrics\n".to_string(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".to_string(),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = reply(StatusCode::OK, render(&snapshot()));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE_TEXT));
    r
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use prometheus_parse::{Scrape, Value};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            decisions: vec![
                ("deny".into(), "connect4".into(), 3),
                ("allow".into(), "connect4".into(), 40),
                ("audit".into(), "skb_ingress".into(), 2),
            ],
            rule_hits: vec![
                (0, "default".into(), 5),
                (7, "/etc/zt/policies/web.toml:12:1".into(), 40),
            ],
            events_produced: 12,
            events_delivered: 9,
            events_lost_kernel: 2,
            events_lost_daemon: 1,
            events_evicted: 4,
            events_suppressed: 30,
            follower_missed: 6,
            history_events: 5,
            followers: 1,
            ring_fill_bytes: 0,
            ring_size_bytes: 1 << 22,
            kernel_errors: vec![("no_policy".into(), 0), ("exe_unreadable".into(), 2)],
            drops: vec![("unparsed".into(), 3)],
            xdp_packets: vec![("eth0".into(), "dropped_closed_port".into(), 17)],
            generation: 3,
            healthy: true,
            last_reload_time: 1_795_737_600,
            last_reload_ok: false,
        }
    }

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap()
    }

    /// `name{labels}` → (value, is_counter).
    fn samples(scrape: &Scrape) -> HashMap<String, (f64, bool)> {
        scrape
            .samples
            .iter()
            .map(|s| {
                let mut labels: Vec<String> =
                    s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                labels.sort();
                let (value, counter) = match s.value {
                    Value::Counter(v) => (v, true),
                    Value::Gauge(v) => (v, false),
                    ref other => panic!("{}: unexpected {other:?}", s.metric),
                };
                (
                    format!("{}{{{}}}", s.metric, labels.join(",")),
                    (value, counter),
                )
            })
            .collect()
    }

    #[test]
    fn render_is_valid_prometheus_text() {
        let text = render(&snapshot());
        let scrape = parse(&text);
        let got = samples(&scrape);
        let want: &[(&str, f64, bool)] = &[
            ("zt_decisions_total{hook=connect4,verdict=deny}", 3.0, true),
            (
                "zt_decisions_total{hook=connect4,verdict=allow}",
                40.0,
                true,
            ),
            (
                "zt_decisions_total{hook=skb_ingress,verdict=audit}",
                2.0,
                true,
            ),
            ("zt_rule_hits_total{location=default,rule_id=0}", 5.0, true),
            (
                "zt_rule_hits_total{location=/etc/zt/policies/web.toml:12:1,rule_id=7}",
                40.0,
                true,
            ),
            ("zt_events_total{stage=produced}", 12.0, true),
            ("zt_events_total{stage=delivered}", 9.0, true),
            ("zt_events_lost_total{stage=kernel}", 2.0, true),
            ("zt_events_lost_total{stage=daemon}", 1.0, true),
            ("zt_history_evicted_total{}", 4.0, true),
            ("zt_events_suppressed_total{}", 30.0, true),
            ("zt_follower_missed_total{}", 6.0, true),
            ("zt_kernel_errors_total{kind=no_policy}", 0.0, true),
            ("zt_kernel_errors_total{kind=exe_unreadable}", 2.0, true),
            ("zt_drops_total{reason=unparsed}", 3.0, true),
            (
                "zt_xdp_packets_total{interface=eth0,outcome=dropped_closed_port}",
                17.0,
                true,
            ),
            ("zt_history_events{}", 5.0, false),
            ("zt_followers{}", 1.0, false),
            ("zt_ring_buffer_fill_bytes{}", 0.0, false),
            ("zt_ring_buffer_size_bytes{}", 4_194_304.0, false),
            ("zt_policy_generation{}", 3.0, false),
            ("zt_healthy{}", 1.0, false),
            ("zt_last_reload_timestamp_seconds{}", 1_795_737_600.0, false),
            ("zt_last_reload_success{}", 0.0, false),
        ];
        for (key, value, counter) in want {
            assert_eq!(got.get(*key), Some(&(*value, *counter)), "{key} in\n{text}");
        }
        assert_eq!(got.len(), want.len(), "{text}");
        // Every family has its HELP and TYPE, under the name of its samples.
        for s in &scrape.samples {
            assert!(s.metric.starts_with("zt_"));
            assert!(
                scrape.docs.contains_key(&s.metric),
                "no HELP for {}",
                s.metric
            );
            let kind = if matches!(s.value, Value::Counter(_)) {
                "counter"
            } else {
                "gauge"
            };
            assert!(
                text.contains(&format!("# TYPE {} {kind}\n", s.metric)),
                "{}",
                s.metric
            );
        }
        // The loss identity holds in the snapshot used.
        let v = |k: &str| got[k].0;
        assert_eq!(
            v("zt_events_total{stage=produced}"),
            v("zt_events_total{stage=delivered}")
                + v("zt_events_lost_total{stage=kernel}")
                + v("zt_events_lost_total{stage=daemon}")
        );
    }

    #[test]
    fn render_escapes_labels_and_skips_empty_families() {
        let mut s = MetricsSnapshot::default();
        s.rule_hits
            .push((1, "/srv/we\"ird\\path.toml:1:1".into(), 1));
        let text = render(&s);
        let scrape = parse(&text);
        // Quotes and backslashes escaped as the format says.
        assert!(
            text.contains(
                r#"zt_rule_hits_total{location="/srv/we\"ird\\path.toml:1:1",rule_id="1"} 1"#
            ),
            "{text}"
        );
        // The parser (which keeps escapes as written) sees one sample with both labels.
        let hits: Vec<_> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == "zt_rule_hits_total")
            .collect();
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].labels.get("rule_id"), Some("1"));
        assert!(hits[0].labels.get("location").is_some());
        assert!(matches!(hits[0].value, Value::Counter(v) if v == 1.0));
        assert!(!text.contains("zt_decisions_total"), "{text}");
        assert!(text.contains("zt_healthy 0\n"));
    }

    async fn get(addr: SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    }

    #[tokio::test]
    async fn serve_round_trip() {
        let server = MetricsServer::bind("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let scrapes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counted = Arc::clone(&scrapes);
        let snap: SnapshotFn = Arc::new(move || {
            let n = counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            MetricsSnapshot {
                generation: 10 + n,
                ..snapshot()
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(snap, stopped));

        let answer = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{head}"
        );
        let got = samples(&parse(body));
        assert_eq!(got["zt_policy_generation{}"], (10.0, false));
        assert_eq!(
            got["zt_decisions_total{hook=connect4,verdict=deny}"],
            (3.0, true)
        );

        // A fresh snapshot per scrape.
        let again = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(again.contains("\nzt_policy_generation 11\n"), "{again}");

        let missing = get(
            addr,
            "GET /other HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        let root = get(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(root.starts_with("HTTP/1.1 404"), "{root}");
        let post = get(
            addr,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert_eq!(scrapes.load(std::sync::atomic::Ordering::SeqCst), 2);

        // A keep-alive connection left open does not hold up shutdown.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");

        stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn serve_reports_bind_errors() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let snap: SnapshotFn = Arc::new(MetricsSnapshot::default);
        let e = serve(addr, snap, std::future::pending::<()>())
            .await
            .unwrap_err();
        assert!(matches!(e, MetricsError::Bind { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()));
    }
}
