//! Unit tests of `TunnelSocket` (SPEC §2.4–§2.6).

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

fn p(n: usize) -> Bytes {
    Bytes::from(vec![0xAB; n])
}

fn big_budget() -> Budget {
    Budget::new(u64::MAX)
}

fn limits(max_bytes: usize, max_messages: usize) -> WindowLimits {
    WindowLimits {
        max_bytes,
        max_messages,
    }
}

fn open(can_hibernate: bool, l: WindowLimits) -> TunnelSocket {
    let mut s = TunnelSocket::new(l);
    assert_eq!(s.take_open_index(), 0);
    assert!(s.on_runner_open(can_hibernate));
    s
}

fn sent_index(m: ClientMsg) -> u16 {
    match m {
        ClientMsg::Send { index, .. } => index,
        other => panic!("expected Send, got {other:?}"),
    }
}

#[test]
fn open_index_is_zero_then_messages_count_from_one() {
    let now = Instant::now();
    let mut b = big_budget();
    for hib in [false, true] {
        let mut s = open(hib, WindowLimits::default());
        for want in 1..=5u16 {
            let m = s.on_client_message(p(1), true, now, &mut b);
            assert_eq!(sent_index(m), want);
        }
        s.check_invariants(&b).unwrap();
        s.close(&mut b);
    }
    assert_eq!(b.used, 0);
}

#[test]
fn text_and_binary_flags_are_kept() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, WindowLimits::default());
    let m = s.on_client_message(p(2), false, now, &mut b);
    assert!(matches!(m, ClientMsg::Send { binary: false, .. }));
    assert!(!s.pending().next().unwrap().binary);
}

#[test]
fn index_wraps_and_is_never_reset_across_detach_attach() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, WindowLimits::default());
    let mut expect: u16 = 1;
    // Send 3 × 2^16 + 10 messages, detaching and reattaching every 10 000.
    for i in 0u32..(3 * 65536 + 10) {
        if i % 10_000 == 9_999 {
            assert_eq!(
                s.on_runner_detached(DetachCause::RunnerLost, &mut b),
                Detach::Keep
            );
            let m = s.on_client_message(p(1), true, now, &mut b);
            assert_eq!(m, ClientMsg::Held { index: expect });
            let replay: Vec<u16> = s.on_runner_attached(now).map(|e| e.index).collect();
            assert_eq!(*replay.last().unwrap(), expect, "held message replayed");
            assert!(s.on_ack(expect, now, &mut b).ignored.is_none());
        } else {
            let m = s.on_client_message(p(1), true, now, &mut b);
            assert_eq!(sent_index(m), expect);
            let a = s.on_ack(expect, now, &mut b);
            assert_eq!((a.freed_messages, a.ignored), (1, None));
        }
        if expect == 65535 {
            assert_eq!(s.next_index(), 0, "wraps to 0 after 65535");
        }
        expect = expect.wrapping_add(1);
    }
    assert_eq!(s.next_index(), expect);
    assert_eq!(s.pending_len(), 0);
    s.check_invariants(&b).unwrap();
}

#[test]
fn byte_total_decreases_on_ack() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, WindowLimits::default());
    for n in [100, 200, 300] {
        s.on_client_message(p(n), true, now, &mut b);
    }
    assert_eq!((s.pending_bytes(), b.used), (600, 600));
    let a = s.on_ack(1, now, &mut b);
    assert_eq!((a.freed_messages, a.freed_bytes), (1, 100));
    assert_eq!((s.pending_bytes(), b.used), (500, 500));
    let a = s.on_ack(3, now, &mut b);
    assert_eq!((a.freed_messages, a.freed_bytes), (2, 500));
    assert_eq!((s.pending_bytes(), s.pending_len(), b.used), (0, 0, 0));
}

#[test]
fn ignored_acks_are_reported() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, WindowLimits::default());
    for _ in 0..3 {
        s.on_client_message(p(1), true, now, &mut b);
    }
    assert_eq!(s.on_ack(4, now, &mut b).ignored, Some(IgnoredAck::Future));
    assert_eq!(s.on_ack(2, now, &mut b).freed_messages, 2);
    assert_eq!(s.on_ack(1, now, &mut b).ignored, Some(IgnoredAck::Stale));
    assert_eq!(s.on_ack(2, now, &mut b), AckResult::default(), "repeat ack");
    assert_eq!(s.pending_len(), 1);
    // No window: acks on a non-hibernatable socket are ignored as such.
    let mut n = open(false, WindowLimits::default());
    n.on_client_message(p(1), true, now, &mut b);
    assert_eq!(n.on_ack(1, now, &mut b).ignored, Some(IgnoredAck::NoWindow));
}

#[test]
fn single_oversized_message_only_into_empty_window() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, limits(1000, 100));
    // Into an empty window: admitted although larger than the cap.
    assert_eq!(
        sent_index(s.on_client_message(p(5000), true, now, &mut b)),
        1
    );
    s.check_invariants(&b).unwrap();
    // Nothing joins it, not even a tiny message.
    assert_eq!(
        s.on_client_message(p(1), true, now, &mut b),
        ClientMsg::Paused
    );
    s.check_invariants(&b).unwrap();
    let a = s.on_ack(1, now, &mut b);
    assert!(a.resume_reading);
    assert_eq!(sent_index(a.resumed.unwrap()), 2);
    // An oversized message behind a pending one waits until the window empties.
    assert_eq!(
        s.on_client_message(p(5000), true, now, &mut b),
        ClientMsg::Paused
    );
    let a = s.on_ack(2, now, &mut b);
    assert_eq!(sent_index(a.resumed.unwrap()), 3);
    assert_eq!((s.pending_len(), s.pending_bytes()), (1, 5000));
    s.check_invariants(&b).unwrap();
}

#[test]
fn backpressure_parks_and_resumes_in_order() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, limits(300, 100));
    for i in 1..=3u16 {
        assert_eq!(
            sent_index(s.on_client_message(p(100), true, now, &mut b)),
            i
        );
    }
    let parked = p(150);
    assert_eq!(
        s.on_client_message(parked.clone(), false, now, &mut b),
        ClientMsg::Paused
    );
    assert!(s.is_paused());
    // While paused nothing else is taken, and no index is consumed.
    let m = s.on_client_message(p(1), true, now, &mut b);
    assert!(matches!(m, ClientMsg::NotReady { .. }));
    assert_eq!(s.next_index(), 4);
    // An ack that frees too little keeps it parked.
    let a = s.on_ack(1, now, &mut b);
    assert_eq!(
        (a.freed_messages, a.resumed.clone(), a.resume_reading),
        (1, None, false)
    );
    assert!(s.is_paused());
    // Enough room: the parked message is sent with the next index, reading resumes.
    let a = s.on_ack(2, now, &mut b);
    assert!(a.resume_reading);
    match a.resumed.unwrap() {
        ClientMsg::Send {
            index,
            data,
            binary,
        } => {
            assert_eq!((index, binary), (4, false));
            assert_eq!(data.as_ptr(), parked.as_ptr(), "no copy");
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.is_paused());
    assert_eq!(sent_index(s.on_client_message(p(1), true, now, &mut b)), 5);
    s.check_invariants(&b).unwrap();
}

#[test]
fn message_cap_pauses() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, limits(1 << 20, 2));
    s.on_client_message(p(0), true, now, &mut b);
    s.on_client_message(p(0), true, now, &mut b);
    assert_eq!(
        s.on_client_message(p(0), true, now, &mut b),
        ClientMsg::Paused
    );
    assert!(s.on_ack(1, now, &mut b).resume_reading);
}

#[test]
fn parked_message_resumed_while_detached_is_held() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, limits(100, 100));
    s.on_client_message(p(100), true, now, &mut b);
    assert_eq!(
        s.on_runner_detached(DetachCause::RunnerLost, &mut b),
        Detach::Keep
    );
    assert_eq!(
        s.on_client_message(p(10), true, now, &mut b),
        ClientMsg::Paused
    );
    // Reattach: the replay holds only the window; the parked message stays parked.
    let replay: Vec<u16> = s.on_runner_attached(now).map(|e| e.index).collect();
    assert_eq!(replay, [1]);
    assert!(s.is_paused());
    assert_eq!(
        s.on_runner_detached(DetachCause::RunnerLost, &mut b),
        Detach::Keep
    );
    // A (late) ack frees room while detached: the parked message is held for replay.
    let a = s.on_ack(1, now, &mut b);
    assert_eq!(a.resumed, Some(ClientMsg::Held { index: 2 }));
    assert!(a.resume_reading);
    let replay: Vec<u16> = s.on_runner_attached(now).map(|e| e.index).collect();
    assert_eq!(replay, [2]);
    s.check_invariants(&b).unwrap();
}

#[test]
fn global_cap_closes_the_socket() {
    let now = Instant::now();
    // Another socket of the shard already holds 900 of 1000 bytes.
    let mut b = Budget {
        used: 900,
        cap: 1000,
    };
    let mut s = open(true, WindowLimits::default());
    assert_eq!(sent_index(s.on_client_message(p(60), true, now, &mut b)), 1);
    assert_eq!(sent_index(s.on_client_message(p(40), true, now, &mut b)), 2);
    assert_eq!(b.used, 1000, "exactly at the cap is allowed");
    let m = s.on_client_message(p(1), true, now, &mut b);
    assert_eq!(m, ClientMsg::Close(CloseReason::PENDING_LIMIT));
    assert_eq!(CloseReason::PENDING_LIMIT.code, 1011);
    assert_eq!(s.state(), SocketState::Closed);
    assert_eq!(b.used, 900, "closing released this socket's bytes");
    assert_eq!(
        s.on_client_message(p(1), true, now, &mut b),
        ClientMsg::Dropped
    );
    s.check_invariants(&b).unwrap();
}

#[test]
fn global_cap_checked_again_when_parked_message_resumes() {
    let now = Instant::now();
    let mut b = Budget { used: 0, cap: 150 };
    let mut s = open(true, limits(100, 100));
    s.on_client_message(p(100), true, now, &mut b);
    assert_eq!(
        s.on_client_message(p(100), true, now, &mut b),
        ClientMsg::Paused
    );
    // Meanwhile other sockets of the shard fill the budget.
    b.used += 51;
    let a = s.on_ack(1, now, &mut b);
    assert_eq!(
        a.resumed,
        Some(ClientMsg::Close(CloseReason::PENDING_LIMIT))
    );
    assert!(!a.resume_reading);
    assert_eq!((s.state(), b.used), (SocketState::Closed, 51));
}

#[test]
fn ack_timeout_picks_expired_sockets_not_live_ones() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(30);
    let mut b = big_budget();
    // Socket sent at t0, one at t0 + 20 s, one with nothing pending, one detached.
    let mut old = open(true, WindowLimits::default());
    old.on_client_message(p(1), true, t0, &mut b);
    let mut young = open(true, WindowLimits::default());
    young.on_client_message(p(1), true, t0 + Duration::from_secs(20), &mut b);
    let mut idle = open(true, WindowLimits::default());
    idle.on_client_message(p(1), true, t0, &mut b);
    idle.on_ack(1, t0, &mut b);
    let mut asleep = open(true, WindowLimits::default());
    asleep.on_client_message(p(1), true, t0, &mut b);
    asleep.on_runner_detached(DetachCause::ActorStopped, &mut b);
    let mut plain = open(false, WindowLimits::default());
    plain.on_client_message(p(1), true, t0, &mut b);

    // Exactly at the timeout nothing has expired yet.
    let at = t0 + timeout;
    let socks = [&old, &young, &idle, &asleep, &plain];
    assert!(socks.iter().all(|s| !s.ack_expired(at, timeout)));
    // One second later only the old one has.
    let gc = t0 + Duration::from_secs(31);
    let expired: Vec<bool> = socks.iter().map(|s| s.ack_expired(gc, timeout)).collect();
    assert_eq!(expired, [true, false, false, false, false]);
    assert_eq!(old.ack_deadline(timeout), Some(t0 + timeout));
    assert_eq!(
        young.ack_deadline(timeout),
        Some(t0 + Duration::from_secs(50))
    );
    assert_eq!(asleep.ack_deadline(timeout), None);

    assert_eq!(
        old.expire_if_not_acked(gc, timeout, &mut b),
        Some(CloseReason::NOT_ACKED)
    );
    assert_eq!(old.state(), SocketState::Closed);
    assert_eq!(young.expire_if_not_acked(gc, timeout, &mut b), None);
    assert_eq!(young.state(), SocketState::Open);
    // Later the young one expires too, the asleep one still does not.
    let later = t0 + Duration::from_secs(51);
    assert!(young.ack_expired(later, timeout));
    assert!(!asleep.ack_expired(later, timeout));
    // Waking replays with a fresh deadline: not expired right after the replay.
    assert_eq!(asleep.on_runner_attached(later).count(), 1);
    assert!(!asleep.ack_expired(later + timeout, timeout));
    assert!(asleep.ack_expired(later + timeout + Duration::from_millis(1), timeout));
}

#[test]
fn parked_socket_expires_when_runner_stalls() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(30);
    let mut b = big_budget();
    let mut s = open(true, limits(10, 100));
    s.on_client_message(p(10), true, t0, &mut b);
    assert_eq!(
        s.on_client_message(p(10), true, t0, &mut b),
        ClientMsg::Paused
    );
    assert!(s.ack_expired(t0 + Duration::from_secs(31), timeout));
}

#[test]
fn non_hibernatable_detach_closes() {
    let now = Instant::now();
    let mut b = big_budget();
    let cases = [
        (DetachCause::RunnerLost, CloseReason::RUNNER_DISCONNECTED),
        (DetachCause::ActorStopped, CloseReason::ACTOR_STOPPED),
        (DetachCause::HibernateRequested, CloseReason::CLOSED),
    ];
    for (cause, reason) in cases {
        let mut s = open(false, WindowLimits::default());
        s.on_client_message(p(10), true, now, &mut b);
        assert_eq!(s.on_runner_detached(cause, &mut b), Detach::Close(reason));
        assert_eq!(s.state(), SocketState::Closed);
        assert_eq!(s.on_runner_detached(cause, &mut b), Detach::AlreadyClosed);
        assert_eq!(s.on_runner_attached(now).count(), 0);
    }
    assert_eq!(CloseReason::RUNNER_DISCONNECTED.code, 1011);
    assert_eq!(
        CloseReason::RUNNER_DISCONNECTED.reason,
        "ws.runner_disconnected"
    );
    assert_eq!(CloseReason::ACTOR_STOPPED.code, 1000);
    assert_eq!(b.used, 0);
}

#[test]
fn hibernatable_detach_holds_and_replays_with_original_indices() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = open(true, WindowLimits::default());
    let sent: Vec<Bytes> = (0..4).map(|i| p(10 + i)).collect();
    for d in &sent[..3] {
        s.on_client_message(d.clone(), true, now, &mut b);
    }
    s.on_ack(1, now, &mut b);
    assert_eq!(
        s.on_runner_detached(DetachCause::RunnerLost, &mut b),
        Detach::Keep
    );
    assert_eq!(s.state(), SocketState::Detached);
    assert_eq!(
        s.on_client_message(sent[3].clone(), true, now, &mut b),
        ClientMsg::Held { index: 4 }
    );
    let replay: Vec<(u16, *const u8)> = s
        .on_runner_attached(now)
        .map(|e| (e.index, e.data.as_ptr()))
        .collect();
    let want: Vec<(u16, *const u8)> = (2..=4u16)
        .zip(&sent[1..])
        .map(|(i, d)| (i, d.as_ptr()))
        .collect();
    assert_eq!(replay, want);
    assert_eq!(s.state(), SocketState::Open);
    assert_eq!(sent_index(s.on_client_message(p(1), true, now, &mut b)), 5);
    s.check_invariants(&b).unwrap();
}

#[test]
fn opening_socket_takes_no_messages_and_refuses_on_runner_loss() {
    let now = Instant::now();
    let mut b = big_budget();
    let mut s = TunnelSocket::new(WindowLimits::default());
    let m = s.on_client_message(p(3), true, now, &mut b);
    assert!(matches!(m, ClientMsg::NotReady { ref data, .. } if data.len() == 3));
    assert_eq!(s.on_ack(0, now, &mut b).ignored, Some(IgnoredAck::NoWindow));
    assert_eq!(
        s.on_runner_detached(DetachCause::RunnerLost, &mut b),
        Detach::Close(CloseReason::RUNNER_DISCONNECTED)
    );
    assert!(!s.on_runner_open(true), "open after close is refused");
}

#[test]
fn second_runner_open_is_ignored() {
    let mut s = open(true, WindowLimits::default());
    assert!(!s.on_runner_open(false));
    assert!(s.is_hibernatable());
}

#[test]
fn close_frees_everything_and_keeps_the_index() {
    let now = Instant::now();
    let mut b = Budget {
        used: 7,
        cap: u64::MAX,
    };
    let mut s = open(true, limits(10, 100));
    s.on_client_message(p(10), true, now, &mut b);
    s.on_client_message(p(10), true, now, &mut b);
    assert!(s.is_paused());
    s.close(&mut b);
    assert_eq!((b.used, s.pending_len(), s.is_paused()), (7, 0, false));
    assert_eq!(s.next_index(), 2);
    s.close(&mut b);
    assert_eq!(b.used, 7, "close is idempotent");
    s.check_invariants(&b).unwrap();
}
