//! Tests of the whole conversation through real framing: over an in-memory buffer and over a
//! connected `UnixStream` pair, with the two sides in two threads where the stream would
//! otherwise fill up. They must never depend on timing beyond generous read timeouts that turn
//! a hang (e.g. an unflushed message) into a failure.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use flotilla_store::StorePath;
use proptest::prelude::*;

use crate::frame::{self, FrameKind};
use crate::handshake::{client_handshake_range, server_handshake_range};
use crate::*;

type Unix = Connection<UnixStream, UnixStream>;

const P1: &str = "/nix/store/lyklk3c3m7576knld0dg2rpspz1x9apk-busybox-static";
const P2: &str = "/nix/store/0c0rd7r1g5vj3d5y5ij1yl0vj8pk3c8a-hello-2.12";
const HASH: &str = "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
const MIB: usize = 1024 * 1024;

fn sp(s: &str) -> StorePath {
    StorePath::parse(s).unwrap()
}

/// Two connected ends; reads time out so a protocol hang fails the test instead.
fn pair() -> (Unix, Unix) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    }
    (Connection::unix(a).unwrap(), Connection::unix(b).unwrap())
}

/// Bytes that compress somewhat but not trivially, like a NAR.
fn sample(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9e37_79b9;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if i % 3 == 0 {
                b'a' + (i % 7) as u8
            } else {
                x as u8
            }
        })
        .collect()
}

/// Splits wire bytes into their frames' kinds and payload sizes.
fn frames_of(mut wire: &[u8]) -> Vec<(FrameKind, usize)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while let Some(kind) = frame::read_frame(&mut wire, &mut buf).unwrap() {
        out.push((kind, buf.len()));
    }
    out
}

fn activation_report() -> ActivationReport {
    ActivationReport {
        dry_run: false,
        etc_added: vec!["hosts".into()],
        etc_changed: vec!["nginx/nginx.conf".into()],
        etc_removed: vec!["motd".into()],
        users_added: vec!["nginx".into()],
        users_removed: vec!["old".into()],
        services_started: vec!["nginx".into()],
        services_stopped: vec!["apache".into()],
        services_restarted: vec!["sshd".into()],
        services_unchanged: vec!["cron".into()],
        messages: vec!["a reboot is needed for the new kernel".into()],
    }
}

/// One of every request. The match makes adding a variant without a test a compile error.
fn all_requests() -> Vec<Request> {
    let all = vec![
        Request::QueryMissing {
            paths: vec![sp(P1), sp(P2)],
        },
        Request::AddPaths {
            paths: vec![PathInfo {
                path: sp(P2),
                references: vec![sp(P1), sp(P2)],
                nar_hash: HASH.parse().unwrap(),
                nar_size: 12_345,
            }],
            compression: Compression::Zstd,
        },
        Request::Substitute {
            paths: vec![PathInfo {
                path: sp(P2),
                references: vec![sp(P1)],
                nar_hash: HASH.parse().unwrap(),
                nar_size: 12_345,
            }],
            caches: vec!["http://10.231.0.1:8080".into()],
            trusted_keys: vec!["cache-1:gQ7eaoE+XVkVbHAKpmzzKkz/hKLRiHg3AVMNFKUW8JM=".into()],
        },
        Request::Plan { toplevel: sp(P2), manifest: Some("{}".into()), keys_written: vec!["db-password".into()], goal: Some(ActivationGoal::Boot) },
        Request::Activate {
            toplevel: sp(P2),
            goal: ActivationGoal::DryActivate,
            confirm_within_secs: Some(30),
            check_timeout_secs: Some(60),
        },
        Request::Confirm { generation: 7 },
        Request::Rollback { to: Some(3), reason: Some("deployer check failed".into()) },
        Request::ListGenerations,
        Request::DeleteGenerations {
            keep_last: Some(5),
            older_than_secs: None,
        },
        Request::CollectGarbage,
        Request::Status,
        Request::Current {
            toplevel: sp(P2),
            goal: ActivationGoal::Switch,
            keys: vec![KeyState { name: "db-password".into(), dest_dir: "/run/keys".into(), user: "postgres".into(), group: "root".into(), mode: 0o640, digest: "sha256:00".into() }],
        },
        Request::CheckHealth,
        Request::ListKeys,
        Request::PutKeys {
            put: vec![KeyUpload {
                name: "db-password".into(),
                dest_dir: "/run/keys".into(),
                user: "postgres".into(),
                group: "root".into(),
                mode: 0o640,
                data: b"hunter2".to_vec(),
            }],
            remove: vec!["old".into()],
            switching_to: Some(sp(P2)),
        },
        Request::Exec { argv: vec!["sh".into(), "-l".into()], tty: Some(Terminal { rows: 24, cols: 80, term: "xterm".into() }) },
        Request::Exec { argv: vec!["cat".into()], tty: None },
        Request::PowerOff,
        Request::Goodbye,
    ];
    for r in &all {
        match r {
            Request::QueryMissing { .. }
            | Request::AddPaths { .. }
            | Request::Substitute { .. }
            | Request::Plan { .. }
            | Request::Activate { .. }
            | Request::Confirm { .. }
            | Request::Rollback { .. }
            | Request::ListGenerations
            | Request::DeleteGenerations { .. }
            | Request::CollectGarbage
            | Request::Status
            | Request::Current { .. }
            | Request::CheckHealth
            | Request::ListKeys
            | Request::PutKeys { .. }
            | Request::Exec { .. }
            | Request::PowerOff
            | Request::Goodbye => {}
        }
    }
    all
}

fn health_result() -> HealthResult {
    HealthResult {
        service: "web".into(),
        check: "http http://127.0.0.1/".into(),
        healthy: false,
        probes: 10,
        output: "HTTP/1.0 500 Internal Server Error".into(),
    }
}

/// One of every response. The match makes adding a variant without a test a compile error.
fn all_responses() -> Vec<Response> {
    let all = vec![
        Response::Missing {
            paths: vec![sp(P1)],
        },
        Response::PathsAdded {
            paths: 2,
            bytes: 1 << 33,
        },
        Response::Activated {
            generation: 8,
            report: activation_report(),
            health: vec![health_result()],
            awaiting_confirmation: true,
        },
        Response::Confirmed { generation: 8 },
        Response::Generations {
            generations: vec![
                GenerationInfo {
                    number: 7,
                    toplevel: sp(P1),
                    created_unix: 1_700_000_000,
                    current: false,
                    failed: Some("health check of web failed".into()),
                },
                GenerationInfo {
                    number: 8,
                    toplevel: sp(P2),
                    created_unix: 1_700_000_100,
                    current: true,
                    failed: None,
                },
            ],
        },
        Response::GenerationsDeleted {
            deleted: vec![1, 2, 3],
        },
        Response::GarbageCollected {
            paths: 40,
            bytes: 123_456_789,
        },
        Response::Status {
            generation: Some(8),
            toplevel: Some(sp(P2)),
            services: vec![
                ServiceStatus {
                    name: "nginx".into(),
                    state: ServiceState::Running,
                    pid: Some(42),
                    restarts: 0,
                    last_exit: None,
                    since_unix: 1_700_000_101,
                    waiting_for: vec![],
                },
                ServiceStatus {
                    name: "worker".into(),
                    state: ServiceState::Backoff,
                    pid: None,
                    restarts: 3,
                    last_exit: Some("exit status 1".into()),
                    since_unix: 1_700_000_150,
                    waiting_for: vec!["token".into()],
                },
            ],
            store_free_bytes: Some(1 << 30),
            pending_confirmation: Some(8),
        },
        Response::Current {
            differs: Some("it runs generation 7 of another system".into()),
            generation: Some(7),
            toplevel: Some(sp(P2)),
            services: vec![],
            store_free_bytes: Some(1 << 30),
            pending_confirmation: None,
        },
        Response::Current { differs: None, generation: Some(8), toplevel: Some(sp(P2)), services: vec![], store_free_bytes: None, pending_confirmation: None },
        Response::Health {
            services: vec![health_result()],
        },
        Response::Keys {
            keys: vec![KeyState {
                name: "db-password".into(),
                dest_dir: "/run/keys".into(),
                user: "postgres".into(),
                group: "root".into(),
                mode: 0o640,
                digest: "sha256:00".into(),
            }],
        },
        Response::KeysPut {
            written: vec!["db-password".into()],
            removed: vec![],
            restarted: vec!["postgres".into()],
            started: vec![],
        },
        Response::Planned {
            plan: SystemPlan {
                generation: Some(3),
                next_generation: Some(6),
                toplevel: Some(sp(P1)),
                services: vec![ServicePlan { name: "web".into(), action: ServiceAction::Restart, reasons: vec!["command changed".into()] }],
                etc_added: vec!["motd".into()],
                health_checks: vec!["web: http http://127.0.0.1/".into()],
                closure: vec![(sp(P1), 4096)],
                ..Default::default()
            },
        },
        Response::Substituted {
            got: vec![sp(P1)],
            bytes: 4096,
            missed: vec![SubstituteMiss { path: sp(P2), reason: MissReason::Untrusted, detail: "signed by no trusted key".into() }],
        },
        Response::ExecStarted { pid: 4242 },
        Response::Exited { status: CommandExit::Code(7) },
        Response::Exited { status: CommandExit::Signal(9) },
        Response::PoweringOff,
        Response::Progress {
            message: "restarting nginx".into(),
        },
        Response::error(ErrorKind::NotFound, "generation 99 does not exist"),
    ];
    for r in &all {
        match r {
            Response::Missing { .. }
            | Response::PathsAdded { .. }
            | Response::Substituted { .. }
            | Response::Planned { .. }
            | Response::Activated { .. }
            | Response::Confirmed { .. }
            | Response::Generations { .. }
            | Response::GenerationsDeleted { .. }
            | Response::GarbageCollected { .. }
            | Response::Status { .. }
            | Response::Current { .. }
            | Response::Health { .. }
            | Response::Keys { .. }
            | Response::KeysPut { .. }
            | Response::ExecStarted { .. }
            | Response::Exited { .. }
            | Response::PoweringOff
            | Response::Progress { .. }
            | Response::Error { .. } => {}
        }
    }
    all
}

#[test]
fn every_message_round_trips_through_an_in_memory_buffer() {
    let mut wire = Vec::new();
    {
        let mut conn = Connection::new(io::empty(), &mut wire);
        for r in all_requests() {
            conn.send(&r).unwrap();
        }
        for r in all_responses() {
            conn.send(&r).unwrap();
        }
    }
    let frames = frames_of(&wire);
    assert_eq!(frames.len(), all_requests().len() + all_responses().len());
    assert!(frames.iter().all(|(k, _)| *k == FrameKind::Message));

    let mut conn = Connection::new(wire.as_slice(), io::sink());
    for r in all_requests() {
        assert_eq!(conn.recv::<Request>().unwrap(), r);
    }
    for r in all_responses() {
        assert_eq!(conn.recv::<Response>().unwrap(), r);
    }
    assert!(matches!(conn.recv::<Request>(), Err(ProtocolError::Closed)));
}

#[test]
fn every_message_round_trips_through_a_unix_socket() {
    let (mut deployer, mut agent) = pair();
    let agent_side = thread::spawn(move || {
        for expected in all_requests() {
            assert_eq!(agent.recv::<Request>().unwrap(), expected);
        }
        for r in all_responses() {
            agent.send(&r).unwrap();
        }
        // Stay open until the deployer has read everything: each message must arrive
        // because `send` flushed it, not because the connection closed.
        assert!(matches!(agent.recv::<Request>(), Ok(Request::Goodbye)));
    });
    for r in all_requests() {
        deployer.send(&r).unwrap();
    }
    for expected in all_responses() {
        assert_eq!(deployer.recv::<Response>().unwrap(), expected);
    }
    deployer.goodbye().unwrap();
    agent_side.join().unwrap();
}

#[test]
fn json_shape_is_tagged_snake_case() {
    let json = serde_json::to_string(&Request::QueryMissing {
        paths: vec![sp(P1)],
    })
    .unwrap();
    assert_eq!(
        json,
        format!(r#"{{"type":"query_missing","paths":["{P1}"]}}"#)
    );
    assert_eq!(
        serde_json::to_string(&Request::ListGenerations).unwrap(),
        r#"{"type":"list_generations"}"#
    );
    let hello = Hello {
        magic: MAGIC.into(),
        min_version: 1,
        max_version: 1,
        client: "flotilla 0.1.0".into(),
    };
    assert_eq!(
        serde_json::to_string(&hello).unwrap(),
        r#"{"type":"hello","magic":"flotilla","min_version":1,"max_version":1,"client":"flotilla 0.1.0"}"#
    );
    let welcome = HandshakeReply::Welcome(Welcome {
        version: 1,
        agent_version: "0.1.0".into(),
        root: "/".into(),
    });
    assert_eq!(
        serde_json::to_string(&welcome).unwrap(),
        r#"{"type":"welcome","version":1,"agent_version":"0.1.0","root":"/"}"#
    );
}

#[test]
fn activation_goal_accepts_both_spellings_of_dry_activate() {
    for s in [r#""dry_activate""#, r#""dry-activate""#] {
        assert_eq!(
            serde_json::from_str::<ActivationGoal>(s).unwrap(),
            ActivationGoal::DryActivate
        );
    }
    assert_eq!(
        serde_json::to_string(&ActivationGoal::DryActivate).unwrap(),
        r#""dry_activate""#
    );
    assert_eq!(ActivationGoal::DryActivate.to_string(), "dry-activate");
}

#[test]
fn strict_messages_reject_unknown_fields_and_bad_paths() {
    let unknown = r#"{"type":"rollback","to":null,"force":true}"#;
    assert!(serde_json::from_str::<Request>(unknown).is_err());
    let bad_path = r#"{"type":"query_missing","paths":["/usr/bin/sh"]}"#;
    let err = serde_json::from_str::<Request>(bad_path).unwrap_err();
    assert!(err.to_string().contains("is not in /nix/store"), "{err}");
    // The handshake is the forward-compatible part: a later client may add fields.
    let later = r#"{"type":"hello","magic":"flotilla","min_version":1,"max_version":9,"client":"x","features":["y"]}"#;
    assert_eq!(serde_json::from_str::<Hello>(later).unwrap().max_version, 9);
    // An error kind from a newer agent still arrives, with its message.
    let newer = r#"{"type":"error","kind":"quota_exceeded","message":"disk quota"}"#;
    assert_eq!(
        serde_json::from_str::<Response>(newer).unwrap(),
        Response::error(ErrorKind::Other, "disk quota")
    );
}

#[test]
fn key_material_never_shows_in_debug_output() {
    let put = Request::PutKeys {
        put: vec![KeyUpload {
            name: "token".into(),
            dest_dir: "/run/keys".into(),
            user: "root".into(),
            group: "root".into(),
            mode: 0o600,
            data: b"s3cr3t-material".to_vec(),
        }],
        remove: vec![],
        switching_to: None,
    };
    let shown = format!("{put:?} {put:#?}");
    assert!(!shown.contains("s3cr3t") && !shown.contains("115, 51"), "{shown}");
    assert!(shown.contains("<15 bytes redacted>"), "{shown}");
}

#[test]
fn answers_match_their_requests() {
    let status = Response::Status {
        generation: None,
        toplevel: None,
        services: vec![],
        store_free_bytes: None,
        pending_confirmation: None,
    };
    assert!(Request::Status.is_answered_by(&status));
    assert!(!Request::ListGenerations.is_answered_by(&status));
    assert!(Request::Status.is_answered_by(&Response::error(ErrorKind::Io, "x")));
    assert!(!Request::Status.is_answered_by(&Response::Progress {
        message: "x".into()
    }));
    assert!(!Request::Goodbye.is_answered_by(&Response::error(ErrorKind::Io, "x")));
    assert!(Request::PowerOff.is_answered_by(&Response::PoweringOff));
    assert!(!Request::Status.is_answered_by(&Response::PoweringOff));
}

#[test]
fn handshake_accepts_a_matching_client() {
    let (mut deployer, mut agent) = pair();
    let agent_side = thread::spawn(move || server_handshake(&mut agent, "0.1.0", "/machines/web1"));
    let welcome = client_handshake(&mut deployer, "flotilla 0.1.0").unwrap();
    assert_eq!(
        welcome,
        Welcome {
            version: PROTOCOL_VERSION,
            agent_version: "0.1.0".into(),
            root: "/machines/web1".into(),
        }
    );
    assert_eq!(agent_side.join().unwrap().unwrap(), PROTOCOL_VERSION);
}

#[test]
fn handshake_picks_the_highest_common_version() {
    let (mut deployer, mut agent) = pair();
    let agent_side = thread::spawn(move || server_handshake_range(&mut agent, "0.3.0", "/", 2, 4));
    let welcome = client_handshake_range(&mut deployer, "flotilla 0.2.0", 1, 3).unwrap();
    assert_eq!(welcome.version, 3);
    assert_eq!(agent_side.join().unwrap().unwrap(), 3);
}

#[test]
fn handshake_refuses_an_old_agent_and_both_sides_say_why() {
    let (mut deployer, mut agent) = pair();
    let agent_side = thread::spawn(move || server_handshake_range(&mut agent, "0.1.0", "/", 1, 1));
    let err = client_handshake_range(&mut deployer, "flotilla 0.5.0", 2, 3).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the agent (version 0.1.0) refused this flotilla: it speaks protocol version 1, \
         this flotilla speaks protocol versions 2 to 3; the agent is older than this flotilla: \
         redeploy the agent so that it matches"
    );
    let err = agent_side.join().unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        "refused client `flotilla 0.5.0`: it speaks protocol versions 2 to 3, \
         this agent speaks protocol version 1"
    );
}

#[test]
fn handshake_refuses_a_newer_agent_with_the_other_advice() {
    let (mut deployer, mut agent) = pair();
    let agent_side = thread::spawn(move || server_handshake_range(&mut agent, "0.9.0", "/", PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2));
    let err = client_handshake(&mut deployer, "flotilla 0.1.0").unwrap_err();
    match &err {
        ProtocolError::AgentRefused {
            reason,
            agent_min,
            agent_max,
            ..
        } => {
            assert_eq!((*agent_min, *agent_max), (PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2));
            assert!(reason.contains(&format!("client `flotilla 0.1.0` speaks protocol versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}")), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .ends_with("upgrade flotilla, or redeploy the agent from this one"),
        "{err}"
    );
    assert!(agent_side.join().unwrap().is_err());
}

#[test]
fn server_rejects_a_hello_without_magic() {
    let (mut client, mut agent) = pair();
    let agent_side = thread::spawn(move || server_handshake(&mut agent, "0.1.0", "/"));
    client
        .send(&Hello {
            magic: "nixops".into(),
            min_version: 1,
            max_version: 1,
            client: "?".into(),
        })
        .unwrap();
    let err = agent_side.join().unwrap().unwrap_err();
    assert_eq!(
        err.to_string(),
        r#"the client is not flotilla (its hello carried magic "nixops")"#
    );
    assert!(matches!(
        client.recv::<HandshakeReply>().unwrap(),
        HandshakeReply::Refused(_)
    ));
}

#[test]
fn handshake_with_something_that_is_not_an_agent_shows_what_it_said() {
    let (mut deployer, agent) = pair();
    let (_, mut raw) = agent.into_inner().unwrap();
    raw.write_all(b"Welcome to Ubuntu 24.04 LTS\nLast login: yesterday\n")
        .unwrap();
    let err = client_handshake(&mut deployer, "flotilla").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ProtocolError::NotAnAgent { .. }), "{msg}");
    assert!(
        msg.contains(r#"it sent "Welcome to Ubuntu 24.04 LTS\nLast login: yesterday\n""#),
        "{msg}"
    );
}

#[test]
fn handshake_preview_covers_short_text_and_foreign_json() {
    let (mut deployer, agent) = pair();
    let (_, mut raw) = agent.into_inner().unwrap();
    raw.write_all(b"hi\n").unwrap();
    drop(raw);
    let err = client_handshake(&mut deployer, "flotilla").unwrap_err();
    assert!(err.to_string().contains(r#"it sent "hi\n""#), "{err}");

    let mut wire = Vec::new();
    frame::write_frame(&mut wire, FrameKind::Message, br#"{"type":"hola"}"#).unwrap();
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let err = client_handshake(&mut conn, "flotilla").unwrap_err();
    assert!(
        err.to_string().contains(r#"it sent "{\"type\":\"hola\"}""#),
        "{err}"
    );
}

#[test]
fn handshake_with_a_peer_that_closes_says_the_agent_did_not_answer() {
    let (mut deployer, agent) = pair();
    drop(agent);
    let err = client_handshake(&mut deployer, "flotilla").unwrap_err();
    assert!(matches!(err, ProtocolError::HandshakeClosed), "{err:?}");
    assert!(
        err.to_string().contains("is flotilla-agent installed"),
        "{err}"
    );
}

#[test]
fn call_passes_progress_on_and_returns_the_final_answer() {
    let (mut deployer, mut agent) = pair();
    let agent_side = thread::spawn(move || {
        assert_eq!(agent.recv::<Request>().unwrap(), Request::Status);
        for m in ["reading state", "asking services"] {
            agent
                .send(&Response::Progress { message: m.into() })
                .unwrap();
        }
        agent
            .send(&Response::Status {
                generation: None,
                toplevel: None,
                services: vec![],
                store_free_bytes: None,
                pending_confirmation: None,
            })
            .unwrap();
        assert_eq!(agent.recv::<Request>().unwrap(), Request::CollectGarbage);
        agent
            .send(&Response::error(
                ErrorKind::Conflict,
                "an activation is running",
            ))
            .unwrap();
        assert_eq!(agent.recv::<Request>().unwrap(), Request::ListGenerations);
        agent.send(&Response::Confirmed { generation: 1 }).unwrap();
    });
    let mut seen = Vec::new();
    let answer = deployer
        .call(&Request::Status, |m| seen.push(m.to_owned()))
        .unwrap();
    assert!(matches!(answer, Response::Status { .. }));
    assert_eq!(seen, ["reading state", "asking services"]);

    let err = deployer.call(&Request::CollectGarbage, |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the agent reported an error (conflict): an activation is running"
    );
    let err = deployer
        .call(&Request::ListGenerations, |_| {})
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "the agent answered a `list_generations` request with `confirmed`; \
         the agent and flotilla disagree about the protocol"
    );
    agent_side.join().unwrap();
}

/// Sends `data` through a bulk stream in writes of `write_size`, returns the wire bytes.
fn write_stream(data: &[u8], write_size: usize, compression: Compression) -> (Vec<u8>, BulkStats) {
    let mut wire = Vec::new();
    let mut conn = Connection::new(io::empty(), &mut wire);
    let mut w = conn.bulk_writer(compression).unwrap();
    for piece in data.chunks(write_size.max(1)) {
        w.write_all(piece).unwrap();
    }
    let stats = w.finish().unwrap();
    drop(conn);
    (wire, stats)
}

/// Reads one bulk stream from `wire` and checks it holds `data` and nothing more.
fn read_stream(wire: &[u8], compression: Compression, data: &[u8]) {
    let mut conn = Connection::new(wire, io::sink());
    let mut r = conn.bulk_reader(compression).unwrap();
    // Read exactly the expected bytes, as a NAR parser does; `finish` must then find the end.
    let mut got = vec![0; data.len()];
    r.read_exact(&mut got).unwrap();
    assert!(got == data, "stream differs");
    let stats = r.finish().unwrap();
    assert_eq!(stats.bytes, data.len() as u64);
    assert!(matches!(conn.recv::<Request>(), Err(ProtocolError::Closed)));
}

#[test]
fn bulk_streams_round_trip_at_every_size_and_compression() {
    let cases: [(&str, usize, usize); 5] = [
        ("many small writes", 3 * MIB + 17, 37),
        ("exactly 1 MiB", MIB, MIB),
        ("0 bytes", 0, 1),
        ("several MiB in one write", 5 * MIB + 3, 5 * MIB + 3),
        ("several MiB in odd writes", 5 * MIB + 3, 100_003),
    ];
    for (name, len, write_size) in cases {
        let data = sample(len);
        for compression in [Compression::None, Compression::Zstd] {
            let (wire, stats) = write_stream(&data, write_size, compression);
            assert_eq!(stats.bytes, len as u64, "{name} {compression:?}");
            let frames = frames_of(&wire);
            assert_eq!(frames.last(), Some(&(FrameKind::DataEnd, 0)), "{name}");
            let data_frames = &frames[..frames.len() - 1];
            assert!(
                data_frames
                    .iter()
                    .all(|&(k, n)| k == FrameKind::Data && (1..=MIB).contains(&n)),
                "{name} {compression:?}: {frames:?}"
            );
            let payload: usize = data_frames.iter().map(|f| f.1).sum();
            assert_eq!(payload as u64, stats.wire_bytes, "{name}");
            if compression == Compression::None {
                // Small writes are gathered: only full frames, then the rest.
                assert_eq!(data_frames.len(), len.div_ceil(MIB), "{name}: {frames:?}");
            } else {
                assert!(stats.wire_bytes < len as u64 || len == 0, "{name}: no gain");
            }
            read_stream(&wire, compression, &data);
        }
    }
}

#[test]
fn bulk_stream_then_messages_over_a_unix_socket() {
    let data = sample(9 * MIB + 5);
    let expected = data.clone();
    let (mut deployer, mut agent) = pair();
    let agent_side = thread::spawn(move || {
        let Request::AddPaths { compression, .. } = agent.recv::<Request>().unwrap() else {
            panic!("expected add_paths");
        };
        let mut r = agent.bulk_reader(compression).unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        let stats = r.finish().unwrap();
        assert!(got == expected);
        agent
            .send(&Response::PathsAdded {
                paths: 1,
                bytes: stats.bytes,
            })
            .unwrap();
    });
    deployer
        .send(&Request::AddPaths {
            paths: vec![],
            compression: Compression::Zstd,
        })
        .unwrap();
    let mut w = deployer.bulk_writer(Compression::Zstd).unwrap();
    io::copy(&mut data.as_slice(), &mut w).unwrap();
    w.finish().unwrap();
    let answer = deployer.wait_response(|_| {}).unwrap();
    assert_eq!(
        answer,
        Response::PathsAdded {
            paths: 1,
            bytes: data.len() as u64
        }
    );
    agent_side.join().unwrap();
}

#[test]
fn data_writer_flush_delivers_a_partial_frame_now() {
    let (mut a, mut b) = pair();
    let reader = thread::spawn(move || {
        let mut r = b.data_reader();
        let mut got = [0u8; 5];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b" world");
        r.finish().unwrap()
    });
    let mut w = a.data_writer();
    w.write_all(b"hello").unwrap();
    w.flush().unwrap();
    // The reader has its five bytes before any more are written: with a lost flush this
    // sleep would not help and the read timeout would fail the test.
    thread::sleep(Duration::from_millis(50));
    w.write_all(b" world").unwrap();
    assert_eq!(w.finish().unwrap(), 11);
    assert_eq!(reader.join().unwrap(), 11);
}

#[test]
fn message_in_the_middle_of_a_data_stream_is_rejected() {
    let mut wire = Vec::new();
    frame::write_frame(&mut wire, FrameKind::Data, b"half a NAR").unwrap();
    frame::write_frame(&mut wire, FrameKind::Message, br#"{"type":"status"}"#).unwrap();
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let mut r = conn.data_reader();
    let err = r.read_to_end(&mut Vec::new()).unwrap_err();
    let err = ProtocolError::from_io("reading", err);
    assert_eq!(
        err.to_string(),
        "expected more bulk data or its end, but the other side sent a message frame; \
         the two sides are out of step"
    );
    drop(r);
    let err = conn.recv::<Request>().unwrap_err();
    assert_eq!(
        err.to_string(),
        "the connection is unusable: a bulk data stream was read before its end"
    );
}

#[test]
fn data_where_a_message_belongs_is_rejected() {
    let mut wire = Vec::new();
    frame::write_frame(&mut wire, FrameKind::Data, b"x").unwrap();
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let err = conn.recv::<Request>().unwrap_err();
    assert!(
        err.to_string()
            .starts_with("expected a request, but the other side sent a data frame"),
        "{err}"
    );
}

#[test]
fn trailing_data_is_reported_by_finish() {
    let mut wire = Vec::new();
    frame::write_frame(&mut wire, FrameKind::Data, b"0123456789").unwrap();
    frame::write_frame(&mut wire, FrameKind::DataEnd, b"").unwrap();
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let mut r = conn.bulk_reader(Compression::None).unwrap();
    let mut four = [0u8; 4];
    r.read_exact(&mut four).unwrap();
    assert!(matches!(
        r.finish(),
        Err(ProtocolError::TrailingData { extra: 6 })
    ));
}

#[test]
fn zstd_frames_demanding_a_huge_window_are_refused() {
    let mut compressed = Vec::new();
    let mut enc = zstd::stream::write::Encoder::new(&mut compressed, 3).unwrap();
    enc.window_log(27).unwrap();
    enc.long_distance_matching(true).unwrap();
    enc.write_all(&sample(1000)).unwrap();
    enc.finish().unwrap();
    let mut wire = Vec::new();
    frame::write_frame(&mut wire, FrameKind::Data, &compressed).unwrap();
    frame::write_frame(&mut wire, FrameKind::DataEnd, b"").unwrap();
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let mut r = conn.bulk_reader(Compression::Zstd).unwrap();
    let err = r.read_to_end(&mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("too much memory"), "{err}");
}

#[test]
fn drain_skips_the_rest_so_an_answer_can_follow() {
    for compression in [Compression::None, Compression::Zstd] {
        let data = sample(3 * MIB + 1);
        let (mut wire, _) = write_stream(&data, MIB, compression);
        frame::write_frame(&mut wire, FrameKind::Message, br#"{"type":"status"}"#).unwrap();
        let mut conn = Connection::new(wire.as_slice(), io::sink());
        let mut r = conn.bulk_reader(compression).unwrap();
        let mut first = [0u8; 1000];
        r.read_exact(&mut first).unwrap();
        let stats = r.drain().unwrap();
        assert_eq!(stats.bytes, 1000, "{compression:?}");
        assert_eq!(conn.recv::<Request>().unwrap(), Request::Status);
    }
}

#[test]
fn truncated_streams_are_errors_not_short_data() {
    // Cut inside a data frame's payload.
    let mut wire = Vec::new();
    frame::write_frame(&mut wire, FrameKind::Data, &[1; 100]).unwrap();
    wire.truncate(wire.len() - 90);
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let err = conn.data_reader().read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(
        ProtocolError::from_io("x", err).to_string(),
        "the connection ended in the middle of a bulk data stream, after 10 bytes"
    );

    // Cut between frames, before DataEnd, in a compressed stream.
    let data = sample(3 * MIB);
    let (wire, _) = write_stream(&data, MIB, Compression::Zstd);
    let frames = frames_of(&wire);
    let first = frame::HEADER_LEN + frames[0].1;
    let mut conn = Connection::new(&wire[..first], io::sink());
    let mut r = conn.bulk_reader(Compression::Zstd).unwrap();
    assert!(r.read_to_end(&mut Vec::new()).is_err());

    // Ended early by the sender, inside a zstd frame: short data must not pass as complete.
    let mut wire = wire[..first].to_vec();
    frame::write_frame(&mut wire, FrameKind::DataEnd, b"").unwrap();
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let mut r = conn.bulk_reader(Compression::Zstd).unwrap();
    let err = r.read_to_end(&mut Vec::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");

    // Cut inside a header.
    let mut conn = Connection::new(&[0u8, 0][..], io::sink());
    let err = conn.recv::<Request>().unwrap_err();
    assert!(
        matches!(err, ProtocolError::Truncated { part: "header", .. }),
        "{err}"
    );
}

#[test]
fn oversize_frame_is_rejected_by_the_connection() {
    let mut wire = u32::MAX.to_be_bytes().to_vec();
    wire.push(FrameKind::Message.to_byte());
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let err = conn.recv::<Response>().unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::FrameTooLarge {
                len: u32::MAX,
                max: MAX_FRAME_PAYLOAD
            }
        ),
        "{err}"
    );
}

#[test]
fn oversize_message_is_refused_before_sending() {
    let paths = vec![sp(P1); 300_000];
    let mut wire = Vec::new();
    let mut conn = Connection::new(io::empty(), &mut wire);
    let err = conn.send(&Request::QueryMissing { paths }).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("cannot encode the request: it takes 18"),
        "{err}"
    );
    assert!(
        err.to_string()
            .ends_with("one frame may carry; send it in parts"),
        "{err}"
    );
    drop(conn);
    assert!(wire.is_empty());
}

#[test]
fn abandoned_data_writer_makes_the_connection_refuse_to_send() {
    let mut wire = Vec::new();
    let mut conn = Connection::new(io::empty(), &mut wire);
    let mut w = conn.data_writer();
    w.write_all(b"partial").unwrap();
    drop(w);
    let err = conn.send(&Request::Status).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the connection is unusable: a bulk data stream was written before its end"
    );
}

#[test]
fn boxed_and_stdio_constructors_build_connections() {
    let (a, b) = UnixStream::pair().unwrap();
    let mut left = Connection::boxed(Box::new(a.try_clone().unwrap()), Box::new(a));
    let mut right = Connection::boxed(Box::new(b.try_clone().unwrap()), Box::new(b));
    left.send(&Request::Status).unwrap();
    assert_eq!(right.recv::<Request>().unwrap(), Request::Status);
    // Only built, never used: the test harness owns this process's stdout.
    let stdio = Connection::stdio().unwrap();
    drop(stdio);
}

#[test]
fn connect_unix_names_the_socket_when_it_fails() {
    let path = std::env::temp_dir().join(format!("flotilla-no-agent-{}.sock", std::process::id()));
    let err = Connection::connect_unix(&path).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot connect to the agent socket {}",
            path.display()
        )),
        "{err}"
    );

    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut conn = Connection::unix(stream).unwrap();
        server_handshake(&mut conn, "0.1.0", "/")
    });
    let mut conn = Connection::connect_unix(&path).unwrap();
    client_handshake(&mut conn, "flotilla").unwrap();
    server.join().unwrap().unwrap();
    std::fs::remove_file(&path).unwrap();
}

/// Feeds `bytes` as a peer's output to every reading entry point; none may panic.
fn decode_everything(bytes: &[u8]) {
    let mut conn = Connection::new(bytes, io::sink());
    while conn.recv::<Request>().is_ok() {}
    let mut conn = Connection::new(bytes, io::sink());
    while conn.recv::<Response>().is_ok() {}
    let mut conn = Connection::new(bytes, io::sink());
    let _ = server_handshake(&mut conn, "0", "/");
    let mut conn = Connection::new(bytes, io::sink());
    let _ = client_handshake(&mut conn, "fuzz");
    for compression in [Compression::None, Compression::Zstd] {
        let mut conn = Connection::new(bytes, io::sink());
        if let Ok(mut r) = conn.bulk_reader(compression) {
            let _ = io::copy(&mut r, &mut io::sink());
            let _ = r.finish();
        }
        let _ = conn.recv::<Request>();
    }
}

/// Arbitrary frames: mostly valid headers, so the fuzzing reaches past the header checks.
fn arb_wire() -> impl Strategy<Value = Vec<u8>> {
    let frame = (0u8..5, prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(kind, payload)| {
        let mut f = (payload.len() as u32).to_be_bytes().to_vec();
        f.push(kind);
        f.extend(payload);
        f
    });
    prop::collection::vec(frame, 0..6).prop_map(|fs| fs.concat())
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    #[test]
    fn arbitrary_frames_never_panic_the_decoder(wire in arb_wire()) {
        decode_everything(&wire);
    }

    #[test]
    fn arbitrary_json_messages_never_panic(json in "\\{\"type\":\"[a-z_]{0,20}\".{0,80}\\}") {
        let mut wire = Vec::new();
        frame::write_frame(&mut wire, FrameKind::Message, json.as_bytes()).unwrap();
        decode_everything(&wire);
    }

    #[test]
    fn bulk_stream_survives_any_write_pattern(
        sizes in prop::collection::vec(0usize..300_000, 0..12),
        zstd in any::<bool>(),
    ) {
        let compression = if zstd { Compression::Zstd } else { Compression::None };
        let data = sample(sizes.iter().sum());
        let mut wire = Vec::new();
        let mut conn = Connection::new(io::empty(), &mut wire);
        let mut w = conn.bulk_writer(compression).unwrap();
        let mut rest = data.as_slice();
        for n in sizes {
            let (piece, tail) = rest.split_at(n);
            w.write_all(piece).unwrap();
            rest = tail;
        }
        w.finish().unwrap();
        drop(conn);
        read_stream(&wire, compression, &data);
    }
}

#[test]
fn activation_goals_say_what_they_do() {
    use ActivationGoal::*;
    let row = |g: ActivationGoal| (g.activates(), g.is_checked(), g.sends_keys(), g.adds_generation());
    assert_eq!(row(Switch), (true, true, true, true));
    assert_eq!(row(Boot), (true, false, true, true));
    assert_eq!(row(Test), (true, true, true, false));
    assert_eq!(row(DryActivate), (false, false, false, false));
}

#[test]
fn exec_is_protocol_3_and_is_answered_by_exec_started() {
    assert_eq!(EXEC_PROTOCOL_VERSION, 3);
    const { assert!(PROTOCOL_VERSION >= EXEC_PROTOCOL_VERSION, "this build must speak the version that has Exec") };
    const { assert!(MIN_PROTOCOL_VERSION < EXEC_PROTOCOL_VERSION, "agents from before Exec must still be spoken to") };
    let exec = Request::Exec { argv: vec!["true".into()], tty: None };
    assert!(exec.is_answered_by(&Response::ExecStarted { pid: 1 }));
    assert!(exec.is_answered_by(&Response::error(ErrorKind::NotFound, "no such program")));
    assert!(!exec.is_answered_by(&Response::Exited { status: CommandExit::Code(0) }));
    assert_eq!(
        serde_json::to_string(&exec).unwrap(),
        r#"{"type":"exec","argv":["true"]}"#,
        "no terminal is no field, so the request reads as it did"
    );
    assert_eq!(serde_json::to_string(&Response::Exited { status: CommandExit::Signal(9) }).unwrap(), r#"{"type":"exited","status":{"signal":9}}"#);
}

#[test]
fn substitute_is_protocol_4_and_an_unknown_miss_reason_still_reads() {
    assert_eq!(SUBSTITUTE_PROTOCOL_VERSION, 4);
    const { assert!(PROTOCOL_VERSION >= SUBSTITUTE_PROTOCOL_VERSION, "this build must speak the version that has Substitute") };
    const { assert!(MIN_PROTOCOL_VERSION < SUBSTITUTE_PROTOCOL_VERSION, "agents from before Substitute must still be spoken to") };
    let r = Request::Substitute { paths: vec![], caches: vec![], trusted_keys: vec![] };
    assert!(r.is_answered_by(&Response::Substituted { got: vec![], bytes: 0, missed: vec![] }));
    assert!(!r.is_answered_by(&Response::PathsAdded { paths: 0, bytes: 0 }));
    let later: SubstituteMiss = serde_json::from_str(&format!(r#"{{"path":"{P1}","reason":"cache_on_fire","detail":"it burns"}}"#)).unwrap();
    assert_eq!(later.reason, MissReason::Other);
}

#[test]
fn an_exit_status_reads_as_a_shell_would_give_it() {
    assert_eq!(CommandExit::Code(0).shell_status(), 0);
    assert_eq!(CommandExit::Code(7).shell_status(), 7);
    assert_eq!(CommandExit::Signal(9).shell_status(), 137);
    assert_eq!(CommandExit::Signal(15).shell_status(), 143);
    assert_eq!(CommandExit::Signal(9).to_string(), "killed by signal 9");
}

/// The agent's side of an `Exec` in miniature: stdin echoed back on stdout upper-cased, a
/// note on stderr, then the exit status.
fn play_exec_agent(agent: Unix) -> Vec<u8> {
    let mut agent = agent;
    assert!(matches!(agent.recv::<Request>().unwrap(), Request::Exec { .. }));
    agent.send(&Response::ExecStarted { pid: 77 }).unwrap();
    let (mut input, mut output) = agent.split();
    let mut stdin = Vec::new();
    {
        let mut reader = input.data_reader();
        let mut buf = [0u8; 3];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            stdin.extend_from_slice(&buf[..n]);
            output.send_output(OutputStream::Stdout, &buf[..n].to_ascii_uppercase()).unwrap();
        }
        reader.finish().unwrap();
    }
    output.send_output(OutputStream::Stderr, b"done\n").unwrap();
    output.send(&Response::Exited { status: CommandExit::Code(3) }).unwrap();
    stdin
}

#[test]
fn exec_carries_stdin_out_and_err_apart_and_ends_with_the_status() {
    let (deployer, agent) = pair();
    let agent_side = thread::spawn(move || play_exec_agent(agent));
    let mut deployer = deployer;
    let started = deployer.call(&Request::Exec { argv: vec!["cat".into()], tty: None }, |_| {}).unwrap();
    assert_eq!(started, Response::ExecStarted { pid: 77 });
    let (mut from_agent, mut to_agent) = deployer.split();
    // Both directions at once: stdin goes while output comes back.
    let stdin_side = thread::spawn(move || {
        let mut w = to_agent.data_writer();
        for piece in [&b"hello "[..], b"world", b"\n"] {
            w.write_all(piece).unwrap();
            w.flush().unwrap();
        }
        w.finish().unwrap();
        to_agent
    });
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let status = loop {
        match from_agent.recv_exec_event().unwrap() {
            ExecEvent::Output(OutputStream::Stdout, b) => out.extend_from_slice(b),
            ExecEvent::Output(OutputStream::Stderr, b) => err.extend_from_slice(b),
            ExecEvent::End(end) => match *end {
                Response::Exited { status } => break status,
                other => panic!("{other:?}"),
            },
        }
    };
    stdin_side.join().unwrap();
    assert_eq!(agent_side.join().unwrap(), b"hello world\n");
    assert_eq!((out.as_slice(), err.as_slice(), status), (&b"HELLO WORLD\n"[..], &b"done\n"[..], CommandExit::Code(3)));
}

#[test]
fn large_output_is_cut_into_tagged_frames_that_fit() {
    let mut wire = Vec::new();
    let data = sample(3 * MIB);
    {
        let mut conn = Connection::new(io::empty(), &mut wire);
        conn.send_output(OutputStream::Stderr, &data).unwrap();
    }
    let frames = frames_of(&wire);
    assert_eq!(frames.len(), 4, "{frames:?}");
    assert!(frames.iter().all(|(k, len)| *k == FrameKind::Data && *len <= MIB));
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    let mut back = Vec::new();
    while back.len() < data.len() {
        match conn.recv_exec_event().unwrap() {
            ExecEvent::Output(OutputStream::Stderr, b) => back.extend_from_slice(b),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(back, data);
    assert!(matches!(conn.recv_exec_event(), Err(ProtocolError::Closed)));
}

#[test]
fn malformed_output_frames_are_rejected() {
    for (payload, why) in [(&b""[..], "tag"), (&b"\x09x"[..], "no known stream"), (&b"\x01"[..], "empty")] {
        let mut wire = Vec::new();
        frame::write_frame(&mut wire, FrameKind::Data, payload).unwrap();
        let mut conn = Connection::new(wire.as_slice(), io::sink());
        let err = conn.recv_exec_event().unwrap_err();
        assert!(matches!(err, ProtocolError::MalformedFrame { .. }) && err.to_string().contains(why), "{err}");
    }
    let mut wire = Vec::new();
    frame::write_frame(&mut wire, FrameKind::DataEnd, &[]).unwrap();
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    assert!(matches!(conn.recv_exec_event(), Err(ProtocolError::UnexpectedFrame { .. })));
}

#[test]
fn split_halves_keep_what_was_buffered_and_refuse_the_other_direction() {
    let mut wire = Vec::new();
    {
        let mut conn = Connection::new(io::empty(), &mut wire);
        conn.send(&Response::ExecStarted { pid: 1 }).unwrap();
        conn.send_output(OutputStream::Stdout, b"early").unwrap();
    }
    let mut conn = Connection::new(wire.as_slice(), io::sink());
    assert_eq!(conn.recv::<Response>().unwrap(), Response::ExecStarted { pid: 1 });
    let (mut reading, mut writing) = conn.split();
    assert_eq!(reading.recv_exec_event().unwrap(), ExecEvent::Output(OutputStream::Stdout, b"early"));
    assert!(matches!(reading.send(&Request::Goodbye), Err(ProtocolError::Abandoned(_))));
    assert!(matches!(writing.recv::<Response>(), Err(ProtocolError::Abandoned(_))));
}
