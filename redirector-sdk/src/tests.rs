//! The SDK replays the shared transcripts (redirector-hook/transcripts): it must write every
//! line the transcripts say an application writes, byte for byte after the line's JSON.

use redirector_hook::transcript::{self, Fixture, Step, Transcript, same_line};
use serde_json::Value;

use super::*;

struct App(Mutex<Fixture>);

impl Sessions for App {
    fn export(&self, handoff: &str, clients: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        self.0.lock().unwrap().export(handoff, clients)
    }
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        self.0.lock().unwrap().import(handoff, sessions);
        Ok(())
    }
    fn commit(&self, handoff: &str) {
        self.0.lock().unwrap().commit(handoff);
    }
    fn abort(&self, handoff: &str) {
        self.0.lock().unwrap().abort(handoff);
    }
}

/// Takes the first message the application wrote out of `out`: its line and raw bytes.
fn next_written(out: &mut Vec<u8>, version: Version) -> (Value, Vec<u8>) {
    let end = out.iter().position(|b| *b == b'\n').expect("the application wrote a whole line");
    let line: Vec<u8> = out.drain(..=end).collect();
    let head = frame::Head::parse(&line[..end]).expect("a JSON object");
    let n = if version > Version::V1 { usize::try_from(head.bytes).unwrap() } else { 0 };
    assert!(out.len() >= n, "{n} raw bytes announced, {} written", out.len());
    let raw = out.drain(..n).collect();
    (serde_json::from_slice(&line[..end]).unwrap(), raw)
}

fn replay(t: &Transcript) {
    let Some(Step::App { msg: reg, .. }) = t.steps.iter().find(|s| matches!(s, Step::App { .. })) else { panic!("{}: no register line", t.name) };
    let service: SocketAddr = reg["service"].as_str().unwrap().parse().unwrap();
    let version = Version::from_number(reg["version"].as_u64().unwrap()).unwrap();
    let app = App(Mutex::new(Fixture::default()));
    let unfinished = Mutex::new(Unfinished::new());
    let (mut out, mut registering, mut first_state) = (Vec::new(), true, true);
    for (i, step) in t.steps.iter().enumerate() {
        let at = format!("{} step {}", t.name, i + 1);
        match step {
            Step::State(s) if first_state => *app.0.lock().unwrap() = Fixture::new(s),
            Step::State(s) => assert_eq!(&app.0.lock().unwrap().state(), s, "{at}: the application's sessions"),
            Step::Agent { msg, raw } => {
                let line = serde_json::to_vec(msg).unwrap();
                let r = handle(&app, &unfinished, version, &line, raw, &mut out);
                // An error line ends the connection; anything else is answered.
                assert_eq!(r.is_err(), msg["op"] == "error", "{at}: {r:?}");
            }
            Step::App { msg, raw } => {
                let (got, got_raw) = if registering {
                    registering = false;
                    (serde_json::from_str(&register_line(service, version, &unfinished.lock().unwrap())).unwrap(), Vec::new())
                } else {
                    next_written(&mut out, version)
                };
                same_line(msg, &got).unwrap_or_else(|e| panic!("{at}: {e}"));
                assert_eq!(String::from_utf8_lossy(&got_raw), String::from_utf8_lossy(raw), "{at}: raw bytes");
            }
            Step::Reconnect => {
                assert!(out.is_empty(), "{at}: the application wrote more than the transcript: {}", String::from_utf8_lossy(&out));
                registering = true;
            }
        }
        first_state &= !matches!(step, Step::State(_));
    }
    assert!(out.is_empty(), "{}: the application wrote more than the transcript: {}", t.name, String::from_utf8_lossy(&out));
}

#[test]
fn the_sdk_writes_what_the_shared_transcripts_say() {
    let all = transcript::all();
    assert!(all.len() >= 4, "transcripts found: {}", all.len());
    for t in &all {
        replay(t);
    }
}

#[test]
fn an_error_from_the_agent_ends_the_connection() {
    let (s, u) = (App(Mutex::default()), Mutex::new(Unfinished::new()));
    let mut out = Vec::new();
    assert!(handle(&s, &u, Version::V2, br#"{"op":"error","error":"replaced"}"#, b"", &mut out).is_err());
    assert!(handle(&s, &u, Version::V2, br#"{"op":"registered","service":"x","version":2}"#, b"", &mut out).is_ok() && out.is_empty());
    handle(&s, &u, Version::V2, br#"{"noise":1}"#, b"", &mut out).unwrap();
    assert!(out.is_empty(), "a line without an id is not answered");
}

/// An import as the application got it: its hand-over and its sessions.
type Imported = (String, Vec<(IpAddr, Vec<u8>)>);

/// Records what it imports.
#[derive(Default)]
struct Importer(Mutex<Vec<Imported>>);

impl Sessions for Importer {
    fn export(&self, _: &str, _: &[IpAddr]) -> Vec<(IpAddr, Vec<u8>)> {
        Vec::new()
    }
    fn import(&self, handoff: &str, sessions: Vec<(IpAddr, Vec<u8>)>) -> Result<(), String> {
        self.0.lock().unwrap().push((handoff.to_string(), sessions));
        Ok(())
    }
    fn commit(&self, _: &str) {}
    fn abort(&self, _: &str) {}
}

/// Over a real socket, an import's blobs reach the application each as its own buffer,
/// whatever pieces they arrive in; an import whose lengths do not add up is refused and the
/// connection stays framed.
#[test]
fn imported_blobs_arrive_whole_over_the_socket() {
    use std::os::unix::net::UnixListener;
    let dir = std::env::temp_dir().join(format!("redirector-sdk-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("hook.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = UnixListener::bind(&sock).unwrap();
    let app = Arc::new(Importer::default());
    let hook = Hook::start_version(&sock, "198.18.0.10:80".parse().unwrap(), Some(Version::V2), app.clone());
    let (conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(line.contains("\"register\""), "{line}");
    w.write_all(b"{\"op\":\"registered\",\"service\":\"198.18.0.10:80\",\"version\":2}\n").unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let mut msg = format!(
        "{{\"id\":1,\"op\":\"import\",\"handoff\":\"a/1/b\",\"bytes\":{},\"sessions\":[{{\"client\":\"198.18.1.5\",\"len\":5}},{{\"client\":\"2001:db8::5\",\"len\":0}},{{\"client\":\"198.18.1.6\",\"len\":{}}}]}}\n",
        5 + big.len(),
        big.len()
    )
    .into_bytes();
    msg.extend_from_slice(b"hello");
    msg.extend_from_slice(&big);
    // Malformed: the lengths add up to 3, the line announces 4 (and 4 follow).
    msg.extend_from_slice(b"{\"id\":2,\"op\":\"import\",\"handoff\":\"a/2/b\",\"bytes\":4,\"sessions\":[{\"client\":\"198.18.1.7\",\"len\":3}]}\nwxyz");
    msg.extend_from_slice(b"{\"id\":3,\"op\":\"commit\",\"handoff\":\"a/1/b\"}\n");
    for piece in msg.chunks(7_777) {
        w.write_all(piece).unwrap();
    }
    let mut answers = Vec::new();
    for _ in 0..3 {
        line.clear();
        r.read_line(&mut line).unwrap();
        answers.push(serde_json::from_str::<Value>(&line).unwrap());
    }
    drop(hook);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(answers[0], serde_json::json!({"id":1,"ok":true}));
    assert_eq!(answers[1]["ok"], false);
    assert!(answers[1]["error"].as_str().unwrap().contains("malformed import"), "{}", answers[1]);
    assert_eq!(answers[2], serde_json::json!({"id":3,"ok":true}));
    let got = app.0.lock().unwrap();
    assert_eq!(got.len(), 1, "only the well-formed import reached the application");
    let (handoff, sessions) = &got[0];
    assert_eq!(handoff, "a/1/b");
    let want: Vec<(IpAddr, Vec<u8>)> = vec![("198.18.1.5".parse().unwrap(), b"hello".to_vec()), ("2001:db8::5".parse().unwrap(), Vec::new()), ("198.18.1.6".parse().unwrap(), big)];
    assert!(*sessions == want, "the blobs, each whole and in order");
}
