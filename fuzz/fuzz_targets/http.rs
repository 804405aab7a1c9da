//! The API thread's input: bytes from one connection, framed by `api::http::parse` and
//! routed by `api::routes::route`, under the API thread's seccomp filter. Each request's
//! response is written as the API thread would and must read back as valid HTTP, and each
//! request must be incomplete at any shorter prefix.
#![no_main]

use ember::api::{DEFAULT_MAX_PAYLOAD, http, routes};
use ember_fuzz::{Confined, ThreadKind};
use libfuzzer_sys::fuzz_target;

thread_local! {
    static API: Confined = Confined::start(ThreadKind::Api);
}

fuzz_target!(|data: &[u8]| {
    let data = data.to_vec();
    API.with(|api| api.run(move || connection(&data)));
});

/// Answers every request in `data`, in order, as one keep-alive connection would.
fn connection(data: &[u8]) {
    let mut input = data;
    let mut out = Vec::new();
    let mut answers = 0;
    loop {
        match http::parse(input, DEFAULT_MAX_PAYLOAD) {
            http::Parsed::Complete { request, len } => {
                assert!(len > 0 && len <= input.len(), "{len} of {}", input.len());
                check_prefixes(input, len, data.len());
                input = &input[len..];
                match routes::route(&request.method, &request.path, &request.body) {
                    Ok(_action) => http::write_response(&mut out, 204, None, !request.keep_alive),
                    Err(e) => {
                        let body = http::fault_body(&e.message);
                        check_fault(&body, &e.message);
                        http::write_response(&mut out, e.status, Some(&body), !request.keep_alive);
                    }
                }
                answers += 1;
                if !request.keep_alive {
                    break;
                }
            }
            http::Parsed::Partial { need, .. } => {
                if let Some(need) = need {
                    assert!(need > input.len(), "partial, yet {need} <= {}", input.len());
                }
                break;
            }
            http::Parsed::Error(e) => {
                assert!((400..=599).contains(&e.status), "{e:?}");
                let body = http::fault_body(&e.message);
                check_fault(&body, &e.message);
                http::write_response(&mut out, e.status, Some(&body), true);
                answers += 1;
                break;
            }
        }
    }
    check_responses(&out, answers);
}

/// A request complete at `len` bytes was incomplete before: a client sending it byte by
/// byte (or in two pieces, split anywhere) gets the same answer, and a `need` announced
/// on the way is exact (the connection waits for that many bytes without parsing again).
fn check_prefixes(input: &[u8], len: usize, salt: usize) {
    for cut in [len - 1, salt % len] {
        match http::parse(&input[..cut], DEFAULT_MAX_PAYLOAD) {
            http::Parsed::Partial { need, .. } => {
                if let Some(need) = need {
                    assert_eq!(need, len, "need announced after {cut} bytes");
                }
            }
            other => panic!("{cut} of {len} bytes already parsed as {other:?}"),
        }
    }
}

fn check_fault(body: &str, message: &str) {
    let v: serde_json::Value = serde_json::from_str(body).expect("fault body is JSON");
    assert_eq!(v["fault_message"].as_str(), Some(message));
}

/// `out` holds exactly `count` well-formed responses.
fn check_responses(mut out: &[u8], count: usize) {
    for _ in 0..count {
        let mut headers = [httparse::EMPTY_HEADER; 16];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            other => panic!("bad response {other:?}: {:?}", String::from_utf8_lossy(out)),
        };
        let len = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map_or(0, |h| {
                std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.parse::<usize>().ok())
                    .expect("a numeric Content-Length")
            });
        assert!(
            head + len <= out.len(),
            "body shorter than its Content-Length"
        );
        out = &out[head + len..];
    }
    assert!(out.is_empty(), "bytes after the last response");
}
