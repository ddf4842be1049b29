//! Property tests of the parsers and the heartbeat policy, over random input.

use std::time::{Duration, Instant};

use agent::framing::{Frame, Splitter};
use agent::guest::{Server, ServerConfig, SystemMode};
use agent::protocol::Response;
use agent::{Heartbeat, HeartbeatState};
use proptest::prelude::*;

fn json_object() -> impl Strategy<Value = Vec<u8>> {
    // Strings full of braces, quotes, backslashes and non-ASCII, nested in arrays.
    let s = proptest::collection::vec(
        prop_oneof![
            Just('{'),
            Just('}'),
            Just('"'),
            Just('\\'),
            Just('['),
            Just('é'),
            any::<char>()
        ],
        0..12,
    )
    .prop_map(|v| v.into_iter().collect::<String>());
    (s.clone(), s, 0usize..4).prop_map(|(a, b, depth)| {
        let mut inner = serde_json::json!(b);
        for _ in 0..depth {
            inner = serde_json::json!([inner, {"x": a.clone()}]);
        }
        serde_json::to_vec(&serde_json::json!({"execute": a, "arguments": inner})).unwrap()
    })
}

proptest! {
    /// Objects separated by noise (no `{`, no 0xFF) come out intact, however the stream
    /// is chunked.
    #[test]
    fn splitter_recovers_objects(
        objs in proptest::collection::vec(json_object(), 1..6),
        noise in proptest::collection::vec("[ \n\t}\\]a-z0-9\"]{0,6}", 6),
        cuts in proptest::collection::vec(1usize..50, 0..20),
    ) {
        let mut stream = Vec::new();
        for (i, o) in objs.iter().enumerate() {
            stream.extend(noise[i].as_bytes());
            stream.extend(o);
        }
        let mut sp = Splitter::default();
        let mut out = Vec::new();
        let mut rest = &stream[..];
        for c in cuts {
            let c = c.min(rest.len());
            sp.feed(&rest[..c], &mut out);
            rest = &rest[c..];
        }
        sp.feed(rest, &mut out);
        let expect: Vec<Frame> = objs.into_iter().map(Frame::Text).collect();
        prop_assert_eq!(out, expect);
    }

    /// Arbitrary bytes never panic the splitter or the dispatcher, and every reply is one
    /// decodable JSON line.
    #[test]
    fn server_survives_garbage(data in proptest::collection::vec(any::<u8>(), 0..400)) {
        let dir = tempfile::tempdir().unwrap();
        let server = Server::new(ServerConfig {
            kvp_root: dir.path().join("kvp"),
            blocked: vec!["guest-exec".into()],
            system: SystemMode::Simulated,
        });
        let mut sp = Splitter::default();
        let mut out = Vec::new();
        sp.feed(&data, &mut out);
        for f in out {
            if let Frame::Text(t) = f {
                if let Some(r) = server.handle(&t) {
                    let r = r.strip_prefix(&[0xFF][..]).unwrap_or(&r);
                    prop_assert!(Response::decode(r).is_ok());
                }
            }
        }
        prop_assert!(server.handle(&data).is_some_and(|r| Response::decode(&r).is_ok()));
    }

    /// The heartbeat matches a direct model: no-contact until the first answer, then ok
    /// while the last answer is younger than lost_after, else lost.
    #[test]
    fn heartbeat_matches_model(events in proptest::collection::vec((0u64..4000, any::<bool>()), 0..60)) {
        let lost_after = Duration::from_millis(2500);
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(lost_after);
        let mut now = t0;
        let mut last: Option<Instant> = None;
        let mut reported = HeartbeatState::NoContact;
        for (dt, ok) in events {
            now += Duration::from_millis(dt);
            if ok { last = Some(now); }
            let expect = match last {
                None => HeartbeatState::NoContact,
                Some(t) if now - t < lost_after => HeartbeatState::Ok,
                Some(_) => HeartbeatState::Lost,
            };
            let change = hb.observe(now, ok);
            prop_assert_eq!(hb.state(now), expect);
            prop_assert_eq!(change, (reported != expect).then_some((reported, expect)));
            reported = expect;
        }
    }
}
