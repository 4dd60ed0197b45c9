//! Rise and fall, and what counts, without a network.

use super::*;

fn outcome(ping: bool, failure: Option<&str>) -> Outcome {
    Outcome {
        line: (
            ("192.0.2.100".parse().unwrap(), 80, 6),
            "192.0.2.11".parse().unwrap(),
            80,
        ),
        ping,
        failure: failure.map(String::from),
        source: Some(Ipv4Addr::UNSPECIFIED.into()),
    }
}

#[test]
fn fall_failures_take_a_line_down_and_rise_passes_bring_it_back() {
    let mut h = LineHealth::new(2, 3);
    assert_eq!(h.record(&outcome(false, Some("503"))), None);
    assert_eq!(h.record(&outcome(false, Some("503"))), None);
    assert_eq!(
        h.record(&outcome(false, None)),
        None,
        "a pass resets the count"
    );
    for _ in 0..2 {
        assert_eq!(h.record(&outcome(false, Some("503"))), None);
    }
    assert_eq!(
        h.record(&outcome(false, Some("http GET / returned 503"))),
        Some(Transition::Down {
            reason: "http GET / returned 503".into(),
            failed: 3,
            fall: 3
        })
    );
    assert_eq!(h.record(&outcome(false, Some("x"))), None, "already down");
    assert_eq!(h.record(&outcome(false, None)), None);
    assert_eq!(
        h.record(&outcome(false, None)),
        Some(Transition::Up { passed: 2 })
    );
}

#[test]
fn ping_and_check_count_separately_and_both_must_pass() {
    let mut h = LineHealth::new(1, 2);
    assert_eq!(h.record(&outcome(true, Some("no answer"))), None);
    assert_eq!(
        h.record(&outcome(false, None)),
        None,
        "a passing check does not reset the ping's count"
    );
    assert!(matches!(
        h.record(&outcome(true, Some("no answer"))),
        Some(Transition::Down { .. })
    ));
    assert_eq!(
        h.record(&outcome(false, None)),
        None,
        "still down while the ping fails"
    );
    assert_eq!(
        h.record(&outcome(true, None)),
        Some(Transition::Up { passed: 1 })
    );
}

#[test]
fn failures_that_say_nothing_of_the_server_are_not_counted() {
    let mut h = LineHealth::new(1, 1);
    let no_route = outcome(false, Some("tcp connect: Network is unreachable"));
    assert_eq!(h.judge(&no_route, false), Verdict::Unjudged { first: true });
    assert_eq!(
        h.judge(&no_route, false),
        Verdict::Unjudged { first: false }
    );
    assert!(h.healthy(), "a backup keeps the last state");
    assert_eq!(
        h.judge(&outcome(false, None), false),
        Verdict::Counted(None)
    );
    assert_eq!(
        h.judge(&no_route, false),
        Verdict::Unjudged { first: false },
        "told once, not at every demotion"
    );
    assert!(matches!(
        h.judge(&no_route, true),
        Verdict::Counted(Some(Transition::Down { .. }))
    ));
}

#[test]
fn what_a_failure_seen_from_a_backup_says() {
    let mut nat = Nat::new(
        Ipv4Addr::new(203, 0, 113, 0),
        24,
        Ipv4Addr::new(203, 0, 113, 1),
    );
    nat.v6 = Some(lb_api::config::Nat6 {
        subnet: "2001:db8:1::".parse().unwrap(),
        prefix: 64,
        gateway: "2001:db8:1::1".parse().unwrap(),
    });
    let own = Some(IpAddr::from([203, 0, 113, 3]));
    let outside = Some(IpAddr::from([192, 0, 2, 3]));
    // The primary counts everything.
    assert!(failure_counts(None, true, Some(&nat)));
    // A backup: no route says nothing.
    assert!(!failure_counts(None, false, None));
    assert!(!failure_counts(None, false, Some(&nat)));
    // Direct or tunnel servers: any route will do (backups keep their own view).
    assert!(failure_counts(outside, false, None));
    // NAT servers: only from an address of its own in the NAT subnet.
    assert!(failure_counts(own, false, Some(&nat)));
    assert!(
        !failure_counts(outside, false, Some(&nat)),
        "answers go to the primary"
    );
    assert!(!failure_counts(
        Some([203, 0, 113, 1].into()),
        false,
        Some(&nat)
    ));
    // NAT66 alike.
    let v6 = |a: &str| Some(a.parse::<IpAddr>().unwrap());
    assert!(failure_counts(v6("2001:db8:1::3"), false, Some(&nat)));
    assert!(!failure_counts(v6("2001:db8::3"), false, Some(&nat)));
    assert!(!failure_counts(v6("2001:db8:1::1"), false, Some(&nat)));
}

#[test]
fn a_reload_applies_new_limits_to_the_counts_so_far() {
    let mut h = LineHealth::new(1, 5);
    assert_eq!(h.record(&outcome(false, Some("503"))), None);
    h.set_limits(1, 2);
    assert!(matches!(
        h.record(&outcome(false, Some("503"))),
        Some(Transition::Down { fall: 2, .. })
    ));
}

#[test]
fn jitter_stays_within_a_tenth() {
    let every = Duration::from_millis(2000);
    for s in 0..100 {
        assert!(jitter(every, s) <= Duration::from_millis(200));
    }
    assert_ne!(jitter(every, 1), jitter(every, 2));
}
