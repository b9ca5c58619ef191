//! systemd readiness (`Type=notify`): `READY=1` once the policy is enforced, `RELOADING=1`
//! then `READY=1` around each reload, `STOPPING=1` on the way out. Without `NOTIFY_SOCKET`
//! (not started by systemd) every call does nothing.

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    // A lost notification must never stop the daemon; systemd's timeout reports it.
    let _ = sd_notify::notify(false, states);
}

/// The policy is enforced: the service is up. `status` is shown by `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// The daemon stops (enforcement stays pinned).
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Marks a reload: `RELOADING=1` now, `READY=1` when dropped, whatever the outcome (a
/// refused policy leaves the last good one enforced: the service is still ready).
pub struct Reloading(());

impl Reloading {
    pub fn begin() -> Reloading {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[NotifyState::Reloading, now]),
            Err(_) => send(&[NotifyState::Reloading]),
        }
        Reloading(())
    }
}

impl Drop for Reloading {
    fn drop(&mut self) {
        send(&[NotifyState::Ready]);
    }
}
