//! The real server, on a loopback port and a Unix socket, driven by tonic clients: reports
//! bit-identical to the in-process runtime's, named errors for bad messages while others go
//! on, every limit refused by name, disconnects freeing sessions, drain answering what is
//! in flight, reload, and metrics that parse and move.

mod common;

use std::time::Duration;

use common::*;
use probe_cascade::config::Config;
use probe_cascade::runtime::{Runtime, SessionOptions};
use probe_cascade_server::convert::encode_f32;
use probe_cascade_server::proto::v1 as pb;
use probe_cascade_server::ReloadOutcome;

#[path = "../../tests/common/fs.rs"]
mod fs_support;
use fs_support::copy_dir;

/// What the in-process runtime reports for each row of `trace`, in one session.
async fn in_process(f: &Fixture, config: &str, trace: usize, options: SessionOptions) -> Vec<Outcome> {
    let config = Config::parse(config, std::path::Path::new("test")).unwrap();
    let rt = Runtime::start(f.pack.clone(), &config).await.unwrap();
    let s = rt.open_session(options).await.unwrap();
    let mut out = Vec::new();
    for t in 0..TOKENS {
        let r = s.observe(f.traces[trace].row(t).to_vec()).await.unwrap();
        out.push(local_outcome(&r));
    }
    s.close().await;
    rt.shutdown().await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_over_tcp_and_unix_match_the_in_process_runtime_bit_for_bit() {
    let f = fixture();
    let config = realtime("");
    let server = serve(&f, &config, true, None).await;
    let want = in_process(&f, &config, 1, SessionOptions::default()).await;
    let mut tcp = tcp_client(&server).await;
    let mut unix = unix_client(server.unix_path().unwrap()).await;
    for client in [&mut tcp, &mut unix] {
        let mut s = open(client, Default::default()).await;
        // Pipelined on the wire: every hidden state goes out before any answer is read.
        for t in 0..TOKENS {
            s.send(encode_f32(f.traces[1].row(t))).await;
        }
        for (t, want) in want.iter().enumerate() {
            let r = s.result().await;
            assert_eq!(r.seq, t as u64);
            assert_eq!(report(&r).token, t as u64);
            assert_eq!(&wire_outcome(report(&r)), want, "token {t}");
        }
    }
    // bf16 on the wire: the same as the in-process runtime fed the same bf16 values.
    let bf16_trace: Vec<Vec<f32>> =
        (0..TOKENS).map(|t| f.traces[2].row(t).iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect()).collect();
    let mut s = open(&mut tcp, Default::default()).await;
    for row in &bf16_trace {
        let data: Vec<u8> = row.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect();
        s.send(pb::HiddenState { dtype: pb::Dtype::Bf16 as i32, len: row.len() as u32, data: data.into() }).await;
    }
    let config_parsed = Config::parse(&config, std::path::Path::new("test")).unwrap();
    let rt = Runtime::start(f.pack.clone(), &config_parsed).await.unwrap();
    let local = rt.open_session(Default::default()).await.unwrap();
    for row in &bf16_trace {
        let want = local_outcome(&local.observe(row.clone()).await.unwrap());
        assert_eq!(wire_outcome(report(&s.result().await)), want);
    }
    local.close().await;
    rt.shutdown().await;
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::needless_range_loop)] // `t` indexes a trace row and each session's answers
async fn batched_steps_match_separate_in_process_sessions() {
    let f = fixture();
    let config = realtime("");
    let server = serve(&f, &config, false, None).await;
    let mut client = tcp_client(&server).await;
    let decompose = r#"{"expansion": {"decompose": {"top_k": 5}}}"#;
    let options = [
        pb::SessionOptions::default(),
        pb::SessionOptions { cascade_json: decompose.into(), ..Default::default() },
        pb::SessionOptions { mode: Some("exact".into()), label: "third".into(), ..Default::default() },
    ];
    let mut ids = Vec::new();
    for o in &options {
        ids.push(client.open_session(o.clone()).await.unwrap().into_inner().session_id);
    }
    let mut wants = Vec::new();
    for (i, o) in options.iter().enumerate() {
        let cascade = (!o.cascade_json.is_empty()).then(|| {
            let raw: serde_json::Value = toml::from_str(&config).unwrap();
            let overrides: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&o.cascade_json).unwrap();
            probe_cascade::config::cascade_with(&raw, &overrides).unwrap()
        });
        wants.push(in_process(&f, &config, i, SessionOptions { cascade, ..Default::default() }).await);
    }
    for t in 0..TOKENS {
        let items = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| pb::BatchItem {
                session_id: id,
                hidden: Some(encode_f32(f.traces[i].row(t))),
                layers: Vec::new(),
                text: None,
            })
            .collect();
        let got = client.observe_batch(pb::BatchRequest { items }).await.unwrap().into_inner();
        assert_eq!(got.results.len(), ids.len());
        for (i, r) in got.results.iter().enumerate() {
            assert_eq!(r.seq, i as u64);
            assert_eq!(wire_outcome(report(r)), wants[i][t], "session {i}, token {t}");
        }
    }
    // An unknown session and a bad item fail alone; the rest of the step is answered.
    let items = vec![
        pb::BatchItem { session_id: 999, hidden: Some(encode_f32(f.traces[0].row(0))), layers: Vec::new(), text: None },
        pb::BatchItem { session_id: ids[0], hidden: None, layers: Vec::new(), text: None },
        pb::BatchItem {
            session_id: ids[1],
            hidden: Some(encode_f32(f.traces[1].row(0))),
            layers: Vec::new(),
            text: None,
        },
    ];
    let got = client.observe_batch(pb::BatchRequest { items }).await.unwrap().into_inner();
    assert_eq!(error(&got.results[0]).kind(), pb::ErrorKind::UnknownSession);
    assert!(error(&got.results[0]).message.contains("session 999"), "{:?}", got.results[0]);
    assert_eq!(error(&got.results[1]).kind(), pb::ErrorKind::BadHidden);
    assert_eq!(report(&got.results[2]).token, TOKENS as u64);
    let (status, body) = http_get(&server, "/v1/sessions", None).await;
    assert_eq!(status, 200);
    let views: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(views.as_array().unwrap().len(), 3);
    assert_eq!(views[2]["label"], "third");
    assert_eq!(views[0]["tokens"], TOKENS as u64, "its bad item was not observed");
    client.close_session(pb::CloseSessionRequest { session_id: ids[0] }).await.unwrap();
    let e = client.close_session(pb::CloseSessionRequest { session_id: ids[0] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    assert_eq!(server.state().open_sessions(), 2);
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_fail_their_token_by_name_while_other_sessions_go_on() {
    let f = fixture();
    let config = realtime("");
    let server = serve(&f, &config, false, None).await;
    let mut client = tcp_client(&server).await;
    let mut bad = open(&mut client, Default::default()).await;
    let mut good = open(&mut client, Default::default()).await;
    let want = in_process(&f, &config, 0, SessionOptions::default()).await;
    let row = f.traces[0].row(0);
    let mut nan = row.to_vec();
    nan[7] = f32::NAN;
    let full = encode_f32(row);
    let mut truncated = full.clone();
    truncated.data = truncated.data.slice(..truncated.data.len() - 3);
    let bads = [
        (truncated, pb::ErrorKind::BadHidden, "bytes"),
        (pb::HiddenState { dtype: 7, ..full.clone() }, pb::ErrorKind::BadHidden, "`dtype` = 7"),
        (encode_f32(&row[..100]), pb::ErrorKind::BadHidden, "100"),
        (encode_f32(&nan), pb::ErrorKind::BadHidden, "7"),
    ];
    for (t, (h, _, _)) in bads.iter().enumerate() {
        bad.send(h.clone()).await;
        good.send(encode_f32(f.traces[0].row(t))).await;
    }
    bad.tx.send(open_msg(Default::default())).await.unwrap();
    for (seq, (_, kind, needle)) in bads.iter().enumerate() {
        let r = bad.result().await;
        assert_eq!(r.seq, seq as u64);
        let e = error(&r);
        assert_eq!(e.kind(), *kind, "{e:?}");
        assert!(e.message.contains(needle), "message {:?} should contain {needle:?}", e.message);
    }
    let e = error(&bad.result().await).clone();
    assert!(e.message.contains("must be `hidden`"), "{e:?}");
    // The bad stream still serves good hidden states.
    bad.send(encode_f32(f.traces[0].row(0))).await;
    assert!(report(&bad.result().await).top.len() > 1);
    for (t, want) in want.iter().enumerate().take(bads.len()) {
        assert_eq!(&wire_outcome(report(&good.result().await)), want, "good session, token {t}");
    }
    let (_, metrics) = http_get(&server, "/metrics", None).await;
    assert!(metrics.contains("probe_cascade_errors_total{kind=\"bad_hidden\"}"), "{metrics}");
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_is_refused_by_name() {
    let f = fixture();
    let config = realtime("[serve]\nmax_message_bytes = 4096\nstream_queue = 1\nmax_batch_items = 2\n")
        .replace("max_sessions = 64", "max_sessions = 2");
    let server = serve(&f, &config, false, Some("s3cret")).await;
    let url = format!("http://{}", server.grpc_addr().unwrap());
    let channel = tonic::transport::Endpoint::try_from(url).unwrap().connect().await.unwrap();

    // No token, a wrong one: UNAUTHENTICATED. HTTP views too; health and metrics stay open.
    let mut anonymous = pb::probe_cascade_client::ProbeCascadeClient::new(channel.clone());
    let e = anonymous.info(pb::InfoRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let wrong = |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", "Bearer s3cre7".parse().unwrap());
        Ok(req)
    };
    let mut wrong = pb::probe_cascade_client::ProbeCascadeClient::with_interceptor(channel.clone(), wrong);
    assert_eq!(wrong.info(pb::InfoRequest {}).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(http_get(&server, "/v1/pack", None).await.0, 401);
    assert_eq!(http_get(&server, "/v1/pack", Some("s3cret")).await.0, 200);
    assert_eq!(http_get(&server, "/healthz", None).await.0, 200);
    assert_eq!(http_get(&server, "/v1/sessions", None).await.0, 401);
    assert_eq!(http_get(&server, "/v1/sessions/0/events", None).await.0, 401);
    // The viewer page holds no data, so it needs no token; it asks for one for the routes above.
    let (status, page) = http_get(&server, "/", None).await;
    assert!(status == 200 && page.contains("pc-token") && page.contains("/v1/sessions"), "{status}");
    let right = |mut req: tonic::Request<()>| {
        req.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        Ok(req)
    };
    let mut client = pb::probe_cascade_client::ProbeCascadeClient::with_interceptor(channel, right);
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.max_sessions, info.stream_queue, info.max_batch_items), (2, 1, 2));

    // runtime.max_sessions = 2.
    let open_one = |client: &mut pb::probe_cascade_client::ProbeCascadeClient<_>| {
        let mut c = client.clone();
        async move { c.open_session(pb::SessionOptions::default()).await }
    };
    let a = open_one(&mut client).await.unwrap().into_inner().session_id;
    let b = open_one(&mut client).await.unwrap().into_inner().session_id;
    let e = open_one(&mut client).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("runtime.max_sessions = 2"), "{e}");

    // serve.max_batch_items = 2.
    let item = |id| pb::BatchItem {
        session_id: id,
        hidden: Some(encode_f32(f.traces[0].row(0))),
        layers: Vec::new(),
        text: None,
    };
    let e = client.observe_batch(pb::BatchRequest { items: vec![item(a), item(b), item(a)] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(e.message().contains("serve.max_batch_items = 2"), "{e}");
    client.close_session(pb::CloseSessionRequest { session_id: b }).await.unwrap();

    // serve.stream_queue = 1: hidden states sent faster than they are answered are refused
    // one by one, and every one gets exactly one answer, in order.
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tx.send(open_msg(Default::default())).await.unwrap();
    let mut rx = client.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    rx.message().await.unwrap().unwrap();
    let sent = 64;
    for t in 0..sent {
        tx.send(hidden_msg(encode_f32(f.traces[0].row(t % TOKENS)))).await.unwrap();
    }
    let mut refused = 0;
    for seq in 0..sent {
        let r = match rx.message().await.unwrap().unwrap().kind {
            Some(pb::session_response::Kind::Result(r)) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(r.seq, seq as u64);
        if let Some(pb::token_result::Outcome::Error(e)) = &r.outcome {
            assert_eq!(e.kind(), pb::ErrorKind::Limit);
            assert!(e.message.contains("serve.stream_queue = 1"), "{e:?}");
            refused += 1;
        }
    }
    assert!(refused > 0 && refused < sent, "{refused} of {sent} refused");

    // serve.max_message_bytes = 4096: a unary call is refused naming the limit...
    let big =
        pb::BatchItem { session_id: a, hidden: Some(encode_f32(&vec![0.0; 2048])), layers: Vec::new(), text: None };
    let e = client.observe_batch(pb::BatchRequest { items: vec![big] }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("serve.max_message_bytes = 4096"), "{e}");
    // ...and a stream ends with a status naming it.
    tx.send(hidden_msg(encode_f32(&vec![0.0; 2048]))).await.unwrap();
    let e = rx.message().await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("serve.max_message_bytes = 4096"), "{e}");
    drop(tx);
    server.drain().await;
}

/// Waits until `check` holds, for up to 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{what}: not within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_its_session() {
    let f = fixture();
    let server = serve(&f, &realtime(""), true, None).await;
    let rt = server.state().runtime.clone();
    let baseline = rt.step_stats().await.unwrap();
    for unix in [false, true] {
        let mut client = if unix { unix_client(server.unix_path().unwrap()).await } else { tcp_client(&server).await };
        let mut s = open(&mut client, Default::default()).await;
        for t in 0..10 {
            s.send(encode_f32(f.traces[1].row(t))).await;
        }
        s.result().await;
        assert_eq!(server.state().open_sessions(), 1);
        // Gone mid-stream: answers unread, hidden states unanswered.
        drop(s);
        drop(client);
        eventually("the session is closed", || server.state().open_sessions() == 0).await;
        eventually("the runtime forgets it", || rt.sessions().is_empty()).await;
    }
    let mut stats = rt.step_stats().await.unwrap();
    for _ in 0..100 {
        if stats.sessions == baseline.sessions {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        stats = rt.step_stats().await.unwrap();
    }
    assert_eq!((stats.sessions, stats.held_refs), (baseline.sessions, baseline.held_refs), "slots freed");
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_answers_everything_in_flight_then_refuses() {
    let f = fixture();
    let server = serve(&f, &realtime("[serve]\nstream_queue = 256\n"), false, None).await;
    let mut client = tcp_client(&server).await;
    let mut s = open(&mut client, Default::default()).await;
    let sent = 200;
    for t in 0..sent {
        s.send(encode_f32(f.traces[3].row(t % TOKENS))).await;
    }
    let first = s.result().await;
    assert_eq!(first.seq, 0);
    let state = server.state().clone();
    // A second connection, made before the drain, to watch health while the stream drains:
    // the ~200 hidden states still to score keep the server up for ~200 ms.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        tonic::transport::Endpoint::try_from(format!("http://{}", server.grpc_addr().unwrap()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let drain = tokio::spawn(server.drain());
    let service = "probe_cascade.v1.ProbeCascade".to_string();
    let status = loop {
        let request = tonic_health::pb::HealthCheckRequest { service: service.clone() };
        let status = health.check(request).await.expect("health answers during the drain").into_inner().status();
        if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::NotServing);
    // Every hidden state the server read is answered, in order; then UNAVAILABLE names how
    // many were answered.
    let mut answered = 1u64;
    let end = loop {
        match s.rx.message().await {
            Ok(Some(pb::SessionResponse { kind: Some(pb::session_response::Kind::Result(r)) })) => {
                assert_eq!(r.seq, answered);
                report(&r);
                answered += 1;
            }
            Ok(other) => panic!("{other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end}");
    assert!(end.message().contains(&format!("answering its first {answered} hidden states")), "{end}");
    let drained = drain.await.unwrap();
    assert!(drained.in_time);
    assert!(state.draining());
    assert_eq!(state.open_sessions(), 0);
    assert!(client.info(pb::InfoRequest {}).await.is_err(), "the listener is closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_live_keys_from_the_next_token_and_keeps_out_bad_files() {
    let f = fixture();
    let config = realtime("");
    let server = serve(&f, &config, false, None).await;
    let mut client = tcp_client(&server).await;
    let mut s = open(&mut client, Default::default()).await;
    s.send(encode_f32(f.traces[0].row(0))).await;
    assert_eq!(report(&s.result().await).top.len(), 10);

    std::fs::write(f.dir.path().join("config.toml"), config.replace("report_top_k = 10", "report_top_k = 3")).unwrap();
    let outcome = server.reload().await;
    assert_eq!(outcome, ReloadOutcome::Applied { changed: vec!["cascade.report_top_k"], sessions: 1 });
    s.send(encode_f32(f.traces[0].row(1))).await;
    assert_eq!(report(&s.result().await).top.len(), 3);
    // A new session gets the new file too.
    let mut s2 = open(&mut client, Default::default()).await;
    s2.send(encode_f32(f.traces[0].row(0))).await;
    assert_eq!(report(&s2.result().await).top.len(), 3);

    // Not a config: kept out.
    std::fs::write(f.dir.path().join("config.toml"), "[cascade\nreport_top_k = 5").unwrap();
    assert!(matches!(server.reload().await, ReloadOutcome::Invalid { .. }));
    // A key that cannot change live: refused by name, nothing applied.
    let fixed = config
        .replace("report_top_k = 10", "report_top_k = 5")
        .replace("cache_bytes = 1073741824", "cache_bytes = 2000000000");
    std::fs::write(f.dir.path().join("config.toml"), fixed).unwrap();
    assert_eq!(server.reload().await, ReloadOutcome::Refused { keys: vec!["runtime.cache_bytes"] });
    s.send(encode_f32(f.traces[0].row(2))).await;
    assert_eq!(report(&s.result().await).top.len(), 3);
    let (_, metrics) = http_get(&server, "/metrics", None).await;
    for result in ["applied", "invalid", "refused"] {
        assert!(metrics.contains(&format!("probe_cascade_config_reloads_total{{result=\"{result}\"}}")), "{metrics}");
    }
    server.drain().await;
}

/// One Prometheus text-format sample line: `name{labels} value`.
fn parse_sample(line: &str) -> Option<(String, f64)> {
    let (key, value) = line.rsplit_once(' ')?;
    let name_end = key.find('{').unwrap_or(key.len());
    let name = &key[..name_end];
    let valid = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        && (name_end == key.len() || key.ends_with('}'));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    valid.then(|| (key.to_string(), value))
}

fn samples(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<&str> = comment.split_whitespace().collect();
            assert!(matches!(words.first(), Some(&"HELP") | Some(&"TYPE")), "bad comment line {line:?}");
            if words[0] == "TYPE" {
                assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&words[2]), "{line}");
            }
            continue;
        }
        let (key, value) = parse_sample(line).unwrap_or_else(|| panic!("not a Prometheus sample: {line:?}"));
        assert!(key.starts_with("probe_cascade_"), "unprefixed metric {key}");
        out.insert(key, value);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text_and_move_when_tokens_are_served() {
    let f = fixture();
    let server = serve(&f, &realtime(""), false, None).await;
    let mut client = tcp_client(&server).await;
    let before = samples(&http_get(&server, "/metrics", None).await.1);
    let mut s = open(&mut client, Default::default()).await;
    for t in 0..TOKENS {
        s.send(encode_f32(f.traces[1].row(t))).await;
    }
    for _ in 0..TOKENS {
        report(&s.result().await);
    }
    let (status, text) = http_get(&server, "/metrics", None).await;
    assert_eq!(status, 200);
    let after = samples(&text);
    let delta = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    // Other tests in this process share the recorder: at least this test's tokens.
    assert!(delta("probe_cascade_tokens_total") >= TOKENS as f64, "{text}");
    assert!(delta("probe_cascade_stage_seconds_count{stage=\"total\"}") >= TOKENS as f64, "{text}");
    assert!(after["probe_cascade_cache_misses_total"] > 0.0);
    assert!(after["probe_cascade_step_size_count"] >= TOKENS as f64);
    assert!(after["probe_cascade_step_size_bucket{le=\"+Inf\"}"] >= after["probe_cascade_step_size_bucket{le=\"1\"}"]);
    assert_eq!(after["probe_cascade_sessions_open"], 1.0);
    assert!(after.contains_key("probe_cascade_cache_resident_bytes"));
    assert!(after.contains_key("probe_cascade_reads_in_flight"));
    assert!(after.contains_key("probe_cascade_slots_held_probes"));
    let (status, body) = http_get(&server, "/v1/pack", None).await;
    assert_eq!(status, 200);
    let pack: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pack["concepts"], 300);
    assert_eq!(pack["hierarchy"].as_array().unwrap().len(), 300);
    assert_eq!(http_get(&server, "/readyz", None).await.0, 200);
    server.drain().await;
}

/// On the tch backend (a GPU's path; here `device.cpu_kernel = "torch"`) the metrics show the
/// resident store: its rows (the whole 300-probe pack by default), what was copied in, and
/// activations that found their probe resident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_show_the_resident_store_on_the_tch_backend() {
    let f = fixture();
    let config = realtime("").replace("cpu_kernel = \"auto\"", "cpu_kernel = \"torch\"");
    let server = serve(&f, &config, false, None).await;
    let mut client = tcp_client(&server).await;
    let mut s = open(&mut client, Default::default()).await;
    for t in 0..TOKENS {
        s.send(encode_f32(f.traces[2].row(t))).await;
    }
    for _ in 0..TOKENS {
        report(&s.result().await);
    }
    let after = samples(&http_get(&server, "/metrics", None).await.1);
    assert_eq!(after["probe_cascade_store_rows"], 300.0);
    let uploads = after["probe_cascade_store_uploads_total"];
    assert!(uploads > 0.0 && uploads <= after["probe_cascade_store_resident"], "each probe copied once: {after:?}");
    assert!(after["probe_cascade_store_hits_total"] > 0.0, "{after:?}");
    assert!(after["probe_cascade_weight_bytes_copied_total"] > 0.0);
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_watch_profile_raises_alerts_in_reports_and_metrics() {
    let f = fixture();
    let server = serve(&f, &realtime(""), false, None).await;
    let mut client = tcp_client(&server).await;
    let h = f.pack.hierarchy();
    let watched = h.name(probe_cascade::pack::ConceptId(h.layer_members(0)[0])).to_string();
    let cascade_json = format!(
        r#"{{"report_top_k": 1, "watch": [{{"name": "svc-test", "concepts": ["{watched}"], "threshold": 0.0}}]}}"#
    );
    let mut s = open(&mut client, pb::SessionOptions { cascade_json, ..Default::default() }).await;
    for t in 0..TOKENS {
        s.send(encode_f32(f.traces[1].row(t))).await;
    }
    let mut raised = 0.0;
    for _ in 0..TOKENS {
        let r = report(&s.result().await).clone();
        for a in &r.alerts {
            assert_eq!(a.profile, "svc-test");
            let id = probe_cascade::pack::ConceptId(a.concept_id);
            assert_eq!((h.name(id), h.layer(id) as u32), (a.concept.as_str(), a.layer));
            assert_eq!(a.watched, watched, "one watched concept");
        }
        // Threshold 0: every scored concept in the subtree alerts, though the report shows one.
        assert!(r.alerts.iter().any(|a| a.concept == watched), "the watched base concept is scored every token");
        raised += r.alerts.len() as f64;
    }
    assert!(raised > TOKENS as f64, "alerts beyond the one-concept report: {raised}");
    let after = samples(&http_get(&server, "/metrics", None).await.1);
    assert_eq!(after[r#"probe_cascade_alerts_total{profile="svc-test"}"#], raised, "{after:?}");
    // A profile naming no concept of the pack is refused, naming it.
    let bad = r#"{"watch": [{"name": "x", "concepts": ["NoSuchConcept"]}]}"#;
    let e =
        client.open_session(pb::SessionOptions { cascade_json: bad.into(), ..Default::default() }).await.unwrap_err();
    assert!(e.message().contains("NoSuchConcept"), "{}", e.message());
    // Nor may a client make the server read one of its files.
    let file = r#"{"watch": [{"name": "x", "file": "/etc/passwd"}]}"#;
    let e =
        client.open_session(pb::SessionOptions { cascade_json: file.into(), ..Default::default() }).await.unwrap_err();
    assert!(e.message().contains("cascade.watch[0].file") && !e.message().contains("root"), "{}", e.message());
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_info_over_grpc_is_headspaces_v1_pack_over_http() {
    let f = fixture();
    let config = format!("{}\n[[cascade.watch]]\nname = \"w\"\nconcepts = [\"{}\"]\n", realtime(""), {
        let h = f.pack.hierarchy();
        h.name(probe_cascade::pack::ConceptId(h.layer_members(0)[0])).to_string()
    });
    let server = serve(&f, &config, false, None).await;
    let mut client = tcp_client(&server).await;
    let info = client.pack_info(pb::PackInfoRequest {}).await.unwrap().into_inner();
    let (status, body) = http_get(&server, "/v1/pack/headspace", None).await;
    assert_eq!(status, 200);
    let http: serde_json::Value = serde_json::from_str(&body).unwrap();
    let h = f.pack.hierarchy();
    let mut roots: Vec<String> =
        h.layer_members(0).iter().map(|&c| h.name(probe_cascade::pack::ConceptId(c)).into()).collect();
    roots.sort();
    assert_eq!(info.fields, roots, "fields: the layer-0 names, sorted");
    assert_eq!(http["fields"], serde_json::json!(roots));
    assert_eq!((info.total_lenses, info.calibrated, info.alert_threshold), (300, false, 0.5));
    assert_eq!((http["total_lenses"].as_u64(), http["calibrated"].as_bool()), (Some(300), Some(false)));
    assert_eq!(info.concepts.len(), http["concepts"].as_object().unwrap().len());
    for (name, c) in &info.concepts {
        let j = &http["concepts"][name];
        assert_eq!(
            (j["label"].as_str(), j["level"].as_u64()),
            (Some(c.label.as_str()), Some(c.level as u64)),
            "{name}"
        );
        assert_eq!(j["parent"].as_str(), c.parent.as_deref(), "{name}");
    }
    assert_eq!(info.watch.len(), 1);
    assert_eq!((info.watch[0].name.as_str(), info.watch[0].threshold), ("w", 0.5));
    assert_eq!(http["pack"].as_str(), Some(info.pack.as_str()));
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let f = fixture();
    let server = serve(&f, &realtime(""), false, Some("tok")).await;
    let channel = tonic::transport::Endpoint::try_from(format!("http://{}", server.grpc_addr().unwrap()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    // Open without the token, as orchestrators expect.
    let mut health = HealthClient::new(channel.clone());
    let service = "probe_cascade.v1.ProbeCascade".to_string();
    let status = health.check(HealthCheckRequest { service: service.clone() }).await.unwrap().into_inner();
    assert_eq!(status.status(), ServingStatus::Serving);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        panic!("{answer:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&service) && names.iter().any(|n| n.contains("grpc.health")), "{names:?}");

    server.drain().await;
}

/// A pack of lenses over model layers 4 and 7 (the headspace fixture, imported): each token
/// goes on the wire as one state per model layer, in a stream or a batch, in any layer order,
/// and comes back as the in-process runtime reports it, each lens with its probes. A token
/// without every model layer is a named error, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lenses_over_model_layers_take_one_state_per_layer_on_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    // The fixture pack with its simplex folder: a tripole scored every token.
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/headspace");
    let src = dir.path().join("headspace");
    copy_dir(&fixture.join("pack"), &src);
    copy_dir(&fixture.join("simplex"), &src.join("simplex"));
    let options = probe_cascade::import::ImportOptions::default();
    probe_cascade::import::headspace::import_headspace(&src, &dir.path().join("pack"), &options, |_, _, _| {}).unwrap();
    let pack = std::sync::Arc::new(probe_cascade::pack::Pack::open(dir.path().join("pack")).unwrap());
    let f = Fixture { dir, pack, traces: Vec::new() };
    let config = realtime("");
    let server = serve(&f, &config, false, None).await;
    let mut client = tcp_client(&server).await;
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.model_layers, vec![4, 7]);

    let state = |t: usize, m: u32| -> Vec<f32> {
        (0..16).map(|i| ((t * 31 + i * 7 + m as usize) as f32 * 0.37).sin() * 2.0).collect()
    };
    let layers = |t: usize| -> Vec<pb::LayerState> {
        // Layer 7 first: the order on the wire is free.
        [7, 4].iter().map(|&m| pb::LayerState { model_layer: m, hidden: Some(encode_f32(&state(t, m))) }).collect()
    };
    let parsed = Config::parse(&config, std::path::Path::new("test")).unwrap();
    let rt = Runtime::start(f.pack.clone(), &parsed).await.unwrap();
    let local = rt.open_session(Default::default()).await.unwrap();
    let mut s = open(&mut client, Default::default()).await;
    for t in 0..12 {
        let msg = pb::SessionRequest {
            kind: Some(pb::session_request::Kind::Layers(pb::LayerStates { layers: layers(t) })),
            text: None,
        };
        s.tx.send(msg).await.unwrap();
        let got = s.result().await;
        let want = local.observe_states(vec![state(t, 4).into(), state(t, 7).into()]).await.unwrap();
        assert_eq!(wire_outcome(report(&got)), local_outcome(&want), "token {t}");
        let simplex: Vec<(String, String, f32, Option<f32>)> =
            report(&got).simplex.iter().map(|x| (x.simplex.clone(), x.pole.clone(), x.prob, x.deviation)).collect();
        let local: Vec<(String, String, f32, Option<f32>)> =
            want.simplex.iter().map(|x| (x.simplex.clone(), x.pole.clone(), x.prob, x.deviation)).collect();
        assert_eq!(simplex, local, "token {t}: simplex readings");
        assert_eq!(simplex.len(), 3);
        for (d, e) in report(&got).top.iter().zip(&want.top) {
            let layers: Vec<u32> = d.probes.iter().map(|p| p.model_layer).collect();
            assert_eq!(layers, e.probes.iter().map(|p| p.model_layer).collect::<Vec<_>>());
            assert_eq!(
                d.probes.iter().map(|p| p.calibrated).collect::<Vec<_>>(),
                e.probes.iter().map(|p| p.calibrated).collect::<Vec<_>>()
            );
        }
    }
    // One layer only, and a plain `hidden`: each a named error; the stream answers the next.
    let one = pb::LayerStates { layers: layers(0).into_iter().filter(|l| l.model_layer == 4).collect() };
    s.tx.send(pb::SessionRequest { kind: Some(pb::session_request::Kind::Layers(one)), text: None }).await.unwrap();
    let e = error(&s.result().await).clone();
    assert_eq!(e.kind, pb::ErrorKind::BadHidden as i32);
    assert!(e.message.contains("[4]") && e.message.contains("[4, 7]"), "{}", e.message);
    s.send(encode_f32(&state(0, 4))).await;
    let e = error(&s.result().await).clone();
    assert!(e.kind == pb::ErrorKind::BadHidden as i32 && e.message.contains("model layers [4, 7]"), "{}", e.message);
    // A batch of two sessions, each with its layers.
    // The second stream stays open (dropping it closes its session).
    let other = open(&mut client, Default::default()).await;
    let ids = [s.id, other.id];
    let batch = pb::BatchRequest {
        items: ids
            .iter()
            .map(|&id| pb::BatchItem { session_id: id, hidden: None, layers: layers(20), text: None })
            .collect(),
    };
    let results = client.observe_batch(batch).await.unwrap().into_inner().results;
    assert_eq!(wire_outcome(report(&results[0])).0, wire_outcome(report(&results[1])).0);
    drop(other);
    local.close().await;
    rt.shutdown().await;
    server.drain().await;
}

/// A live-event viewer on a raw connection: sends the request, then reads events as they come.
struct Viewer {
    stream: tokio::net::TcpStream,
    /// What has come and is not parsed yet.
    text: String,
    events: Vec<(u64, serde_json::Value)>,
}

impl Viewer {
    async fn connect(server: &probe_cascade_server::Server, session: u64, last: Option<u64>) -> Self {
        use tokio::io::AsyncWriteExt;
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        // A small receive buffer, so that a viewer that stops reading backs up quickly.
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(server.http_addr().unwrap()).await.unwrap();
        let resume = last.map(|l| format!("last-event-id: {l}\r\n")).unwrap_or_default();
        let req = format!("GET /v1/sessions/{session}/events HTTP/1.1\r\nhost: localhost\r\n{resume}\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut viewer = Viewer { stream, text: String::new(), events: Vec::new() };
        // The server subscribes before it answers, and answers with a first comment: once the
        // response head is here, every later token reaches this viewer.
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 4096];
        while !viewer.text.contains("\r\n\r\n") {
            let read = tokio::time::timeout(Duration::from_secs(30), viewer.stream.read(&mut buf)).await;
            let got = read.expect("the response head arrives within 30 s").unwrap();
            assert!(got > 0, "the connection closed before the response head");
            viewer.text.push_str(&String::from_utf8_lossy(&buf[..got]));
        }
        assert!(viewer.text.starts_with("HTTP/1.1 200"), "{}", viewer.text);
        viewer
    }

    /// Moves every complete event of `text` to `events` (each is one `id:` and one `data:`
    /// line; the chunked encoding's size lines fall between events).
    fn parse(&mut self) {
        while let Some(start) = self.text.find("id: ") {
            let Some(end) = self.text[start..].find("\n\n").map(|e| start + e) else { break };
            let event = &self.text[start + 4..end];
            let (id, data) = event.split_once("\ndata: ").expect("an id line, then a data line");
            self.events.push((id.trim().parse().unwrap(), serde_json::from_str(data).unwrap()));
            self.text.drain(..end + 2);
        }
    }

    /// Reads until `n` events have come; returns every event so far, as (id, JSON).
    async fn until(&mut self, n: usize) -> &[(u64, serde_json::Value)] {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 16];
        while self.events.len() < n {
            let read = tokio::time::timeout(Duration::from_secs(30), self.stream.read(&mut buf)).await;
            let got = read.expect("events arrive within 30 s").unwrap();
            assert!(got > 0, "the stream ended after {} events", self.events.len());
            self.text.push_str(&String::from_utf8_lossy(&buf[..got]));
            self.parse();
        }
        &self.events
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sessions_viewer_gets_each_token_in_order_the_last_one_without_a_next_call() {
    let f = fixture();
    let server = serve(&f, &realtime(""), false, None).await;
    let mut client = tcp_client(&server).await;
    let id = client.open_session(pb::SessionOptions::default()).await.unwrap().into_inner().session_id;
    let mut viewer = Viewer::connect(&server, id, None).await;
    let mut names = Vec::new();
    for t in 0..3 {
        let item = pb::BatchItem {
            session_id: id,
            hidden: Some(encode_f32(f.traces[0].row(t))),
            layers: Vec::new(),
            text: Some(format!("w{t}")),
        };
        let results = client.observe_batch(pb::BatchRequest { items: vec![item] }).await.unwrap().into_inner().results;
        names.push(report(&results[0]).top.iter().map(|d| d.name.clone()).collect::<Vec<_>>());
    }
    // Tokens 0 and 1 go out as the next call is scored; token 2, with no call after it, on the
    // server's tick.
    let events = viewer.until(3).await.to_vec();
    for (t, (id, e)) in events.iter().enumerate() {
        assert_eq!((*id, e["text"].as_str()), (t as u64, Some(format!("w{t}").as_str())));
        let top: Vec<String> =
            e["top"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().into()).collect();
        assert_eq!(top, names[t], "token {t}: the event's top concepts are the report's");
    }
    server.drain().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_carry_each_token_resume_without_duplicates_and_drop_a_viewer_that_stops_reading() {
    let f = fixture();
    let server =
        serve(&f, &realtime("[serve]\nviewer_buffer = 8\nstream_queue = 256\nmax_viewers = 2\n"), false, None).await;
    let mut client = tcp_client(&server).await;
    let mut s = open(&mut client, Default::default()).await;
    let (status, _) = http_get(&server, "/v1/sessions/999/events", None).await;
    assert_eq!(status, 404);
    let mut first = Viewer::connect(&server, s.id, None).await;
    let mut names = Vec::new();
    for t in 0..5 {
        let text = format!("word{t}");
        let hidden = Some(pb::session_request::Kind::Hidden(encode_f32(f.traces[0].row(t))));
        s.tx.send(pb::SessionRequest { kind: hidden, text: Some(text) }).await.unwrap();
        let r = s.result().await;
        names.push(report(&r).top.iter().map(|d| d.name.clone()).collect::<Vec<_>>());
    }
    let events = first.until(5).await.to_vec();
    for (t, (id, e)) in events.iter().enumerate() {
        assert_eq!((*id, e["token"].as_u64()), (t as u64, Some(t as u64)));
        assert_eq!(e["text"], format!("word{t}"));
        let top: Vec<String> =
            e["top"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap().into()).collect();
        assert_eq!(top, names[t], "token {t}: the event's top concepts are the report's");
    }
    // A viewer that saw event 2 reconnects: 3 and 4 once, then the live feed.
    let mut again = Viewer::connect(&server, s.id, Some(2)).await;
    assert_eq!(again.until(2).await.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![3, 4]);
    // A third viewer is one past serve.max_viewers.
    let (status, body) = http_get(&server, &format!("/v1/sessions/{}/events", s.id), None).await;
    assert!(status == 429 && body.contains("serve.max_viewers"), "{status} {body}");
    s.send(encode_f32(f.traces[0].row(5))).await;
    s.result().await;
    let ids: Vec<u64> = again.until(3).await.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![3, 4, 5], "no duplicates");
    // `first` stops reading: once it is a buffer behind it is dropped and counted, and the
    // session never waits for it.
    let dropped = || async {
        let (_, m) = http_get(&server, "/metrics", None).await;
        m.lines().any(|l| l.starts_with("probe_cascade_viewers_dropped_total") && !l.ends_with(" 0"))
    };
    let mut t = 6;
    while !dropped().await {
        assert!(t < 40_000, "a viewer that stopped reading was never dropped");
        for _ in 0..200 {
            s.send(encode_f32(f.traces[0].row(t % TOKENS))).await;
            t += 1;
        }
        for _ in 0..200 {
            assert!(matches!(s.result().await.outcome, Some(pb::token_result::Outcome::Report(_))));
        }
        // The viewer that reads keeps up: the last token's event goes out on the server's
        // tick, with no next token to wait for.
        again.until(t - 3).await;
    }
    // The pipelined tokens reached the reading viewer in order, each once.
    let ids: Vec<u64> = again.events.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, (3..t as u64).collect::<Vec<_>>());
    drop(first);
    drop(s);
}
