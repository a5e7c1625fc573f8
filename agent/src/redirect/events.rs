//! The agent's end of `SY_EVENTS`: connections the kernel sent straight to an endpoint
//! (`mode: kernel`, and the fallback), read as the kernel writes them. One reader per
//! node: while a hand-over overlaps two agents, both read for a moment, so records are
//! checked before they are believed (a torn one is dropped and counted).

use std::{io, mem::size_of};

use aya::maps::{HashMap, MapData, MapError, RingBuf};
use switchyard_common::{ConnEventV1, OrigDstV3, event};
use tokio::io::unix::AsyncFd;

/// A readable `SY_EVENTS`, and `SY_SOCK_ORIG` to tell whether a socket still exists.
pub struct Events {
    ring: AsyncFd<RingBuf<MapData>>,
    sock_orig: HashMap<MapData, u64, OrigDstV3>,
    /// Records dropped because they were not whole `ConnEventV1`s.
    pub malformed: u64,
    /// The agent's network namespace: clients elsewhere are pods.
    pub host_netns: u64,
    /// The kernel does not wake us per record (see `READ_EVERY`).
    tick: tokio::time::Interval,
}

/// How often the ring is read: the kernel writes records without a wake-up (one per
/// record would cost every connect an IPI), and wakes the agent only when the ring
/// fills up, so this is how late `/conns` and endpoint health may learn of a connection.
pub const READ_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

impl Events {
    pub(super) fn new(
        ring: RingBuf<MapData>,
        sock_orig: HashMap<MapData, u64, OrigDstV3>,
        host_netns: u64,
    ) -> io::Result<Self> {
        // SAFETY: the ring owns its map's fd, which stays open, and the same, for as long
        // as the AsyncFd holds the ring.
        let ring =
            unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        let mut tick = tokio::time::interval(READ_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self { ring, sock_orig, malformed: 0, host_netns, tick })
    }

    /// Wait until records may be there (the next read tick, or a wake-up from a ring
    /// filling up), then append every record there is to `out`.
    pub async fn read(&mut self, out: &mut Vec<ConnEventV1>) -> io::Result<()> {
        tokio::select! {
            guard = self.ring.readable_mut() => {
                let mut guard = guard?;
                self.malformed += drain(guard.get_inner_mut(), out);
                // A record written between the drain and here woke nobody: clear, then
                // drain once more.
                guard.clear_ready();
                self.malformed += drain(guard.get_inner_mut(), out);
            }
            _ = self.tick.tick() => self.malformed += drain(self.ring.get_mut(), out),
        }
        Ok(())
    }

    /// Append every record there is now, without waiting.
    pub fn read_now(&mut self, out: &mut Vec<ConnEventV1>) {
        self.malformed += drain(self.ring.get_mut(), out);
    }

    /// Whether the kernel still follows socket `cookie` (its sock_ops entry goes at
    /// close, after the close record is written).
    pub fn tracked(&self, cookie: u64) -> bool {
        !matches!(self.sock_orig.get(&cookie, 0), Err(MapError::KeyNotFound))
    }
}

fn drain(ring: &mut RingBuf<MapData>, out: &mut Vec<ConnEventV1>) -> u64 {
    let mut malformed = 0;
    while let Some(item) = ring.next() {
        match decode(&item) {
            Some(ev) => out.push(ev),
            None => malformed += 1,
        }
    }
    malformed
}

fn decode(bytes: &[u8]) -> Option<ConnEventV1> {
    if bytes.len() < size_of::<ConnEventV1>() {
        return None;
    }
    // SAFETY: the length is checked, ConnEventV1 is plain integers (any bit pattern is
    // valid), and read_unaligned has no alignment requirement.
    let ev = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<ConnEventV1>()) };
    matches!(ev.kind, event::CONNECT | event::ESTABLISHED | event::CLOSED).then_some(ev)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_records_of_a_known_kind_decode() {
        let ev = ConnEventV1 { kind: event::CLOSED, cookie: 7, bytes_acked: 12, ..Default::default() };
        // SAFETY: viewing a plain-integer struct as its bytes.
        let bytes =
            unsafe { std::slice::from_raw_parts((&ev as *const ConnEventV1).cast::<u8>(), size_of::<ConnEventV1>()) };
        assert_eq!(decode(bytes), Some(ev));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None, "short");
        let mut odd = ev;
        odd.kind = 9;
        // SAFETY: as above.
        let odd =
            unsafe { std::slice::from_raw_parts((&odd as *const ConnEventV1).cast::<u8>(), size_of::<ConnEventV1>()) };
        assert_eq!(decode(odd), None, "unknown kind");
    }
}
