//! HTTP/1.1 framing for the API socket: find one request in a connection's input buffer,
//! and write responses. No I/O here, so every framing case is a plain unit test.
//!
//! Only what Firecracker's clients send is supported: `Content-Length` bodies (a chunked
//! body cannot be framed and gets 411), keep-alive, pipelining and `Expect: 100-continue`.

/// More headers than any API client sends; beyond this the request is refused.
const MAX_HEADERS: usize = 32;
/// Request line plus headers. Firecracker allows 1 KiB per line; ours is per request.
pub const MAX_HEAD_BYTES: usize = 8192;

/// A complete request, body included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path as sent, in origin form (`/drives/rootfs`); an absolute-form target
    /// (`http://localhost/drives/rootfs`) is reduced to its path.
    pub path: String,
    pub body: Vec<u8>,
    /// False for `Connection: close`, and for HTTP/1.0 without `Connection: keep-alive`.
    pub keep_alive: bool,
}

/// A request the connection cannot carry on after: the response is sent, then the
/// connection closes, because where the next request starts is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FramingError {
    pub status: u16,
    pub message: String,
}

impl FramingError {
    fn new(status: u16, message: impl Into<String>) -> FramingError {
        FramingError {
            status,
            message: message.into(),
        }
    }
}

/// What the start of a connection's input buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet. `need` is the total length the request will have, once
    /// its headers are in (so the caller need not parse again before that many bytes);
    /// `expect_continue` says the client waits for `100 Continue` before sending its body.
    Partial {
        need: Option<usize>,
        expect_continue: bool,
    },
    /// A whole request, `len` bytes long from the start of the buffer.
    Complete { request: Request, len: usize },
    /// Answer with this and close.
    Error(FramingError),
}

/// Parses the request at the start of `buf`. A `Content-Length` above `max_payload` is
/// refused (413) from the headers alone, before any of the body is buffered.
pub fn parse(buf: &[u8], max_payload: usize) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_HEAD_BYTES {
                return Parsed::Error(FramingError::new(
                    400,
                    format!("The request line and headers exceed {MAX_HEAD_BYTES} bytes."),
                ));
            }
            return Parsed::Partial {
                need: None,
                expect_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Error(FramingError::new(
                400,
                format!("The request has more than {MAX_HEADERS} headers."),
            ));
        }
        Err(e) => {
            return Parsed::Error(FramingError::new(
                400,
                format!("Invalid HTTP request: {e}."),
            ));
        }
    };
    if head_len > MAX_HEAD_BYTES {
        return Parsed::Error(FramingError::new(
            400,
            format!("The request line and headers exceed {MAX_HEAD_BYTES} bytes."),
        ));
    }
    // httparse only returns Complete with all three set; be defensive anyway.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Error(FramingError::new(400, "Invalid HTTP request line."));
    };

    let mut content_length: Option<usize> = None;
    let mut keep_alive = version == 1;
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            let Some(n) = parse_content_length(value) else {
                return Parsed::Error(FramingError::new(
                    400,
                    format!("Invalid value for the Content-Length header: `{value}`."),
                ));
            };
            // Two different lengths make the framing ambiguous (request smuggling).
            if content_length.is_some_and(|c| c != n) {
                return Parsed::Error(FramingError::new(
                    400,
                    "Conflicting Content-Length headers.",
                ));
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if value.eq_ignore_ascii_case("identity") {
                continue;
            }
            if value.to_ascii_lowercase().contains("chunked") {
                return Parsed::Error(FramingError::new(
                    411,
                    "Chunked transfer encoding is not supported; send the body with a \
                     Content-Length header.",
                ));
            }
            return Parsed::Error(FramingError::new(
                400,
                format!("Unsupported Transfer-Encoding `{value}`."),
            ));
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            if value.eq_ignore_ascii_case("100-continue") {
                expect_continue = true;
            } else {
                return Parsed::Error(FramingError::new(
                    417,
                    format!("Unsupported Expect header `{value}`."),
                ));
            }
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > max_payload {
        return Parsed::Error(FramingError::new(
            413,
            format!(
                "Request payload with size {body_len} is larger than the limit of \
                 {max_payload} allowed by server."
            ),
        ));
    }
    // Cannot overflow: both are bounded (MAX_HEAD_BYTES, max_payload checked above), but a
    // caller could pass max_payload = usize::MAX.
    let Some(total) = head_len.checked_add(body_len) else {
        return Parsed::Error(FramingError::new(413, "Request payload too large."));
    };
    let Some(body) = buf.get(head_len..total) else {
        return Parsed::Partial {
            need: Some(total),
            expect_continue,
        };
    };
    Parsed::Complete {
        request: Request {
            method: method.to_string(),
            path: origin_path(target).to_string(),
            body: body.to_vec(),
            keep_alive,
        },
        len: total,
    }
}

/// Digits only: `+5`, `-1`, `0x10` and `5, 5` are all refused, as RFC 9110 asks.
fn parse_content_length(v: &str) -> Option<usize> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

/// `http://localhost/x` -> `/x`; origin-form targets are returned unchanged.
fn origin_path(target: &str) -> &str {
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            return rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/");
        }
    }
    target
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        417 => "Expectation Failed",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// The interim response that lets an `Expect: 100-continue` client send its body.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Appends a whole response to `out`. `body` is JSON; a 204 carries none (nor a
/// Content-Length, which RFC 9110 forbids for 204).
pub fn write_response(out: &mut Vec<u8>, status: u16, body: Option<&str>, close: bool) {
    use std::io::Write;
    // Writing to a Vec cannot fail.
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nServer: ember API\r\n",
        reason(status)
    );
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    match body {
        Some(b) if status != 204 => {
            let _ = write!(
                out,
                "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                b.len()
            );
            out.extend_from_slice(b.as_bytes());
        }
        _ if status == 204 => out.extend_from_slice(b"\r\n"),
        _ => out.extend_from_slice(b"Content-Length: 0\r\n\r\n"),
    }
}

/// Firecracker's error body.
pub fn fault_body(message: &str) -> String {
    serde_json::json!({ "fault_message": message }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 51200;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse(buf, MAX) {
            Parsed::Complete { request, len } => (request, len),
            other => panic!("expected a complete request, got {other:?}"),
        }
    }

    fn error(buf: &[u8]) -> FramingError {
        match parse(buf, MAX) {
            Parsed::Error(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn simple_get() {
        let buf = b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let (r, len) = complete(buf);
        assert_eq!(len, buf.len());
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/machine-config");
        assert!(r.body.is_empty());
        assert!(r.keep_alive);
    }

    #[test]
    fn body_and_absolute_target() {
        let buf = b"PUT http://localhost/actions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        let (r, len) = complete(buf);
        assert_eq!(
            (r.path.as_str(), r.body.as_slice(), len),
            ("/actions", &b"{}"[..], buf.len())
        );
        assert_eq!(origin_path("http://localhost"), "/");
    }

    #[test]
    fn partial_requests_at_every_split() {
        let buf: &[u8] = b"PUT /boot-source HTTP/1.1\r\nContent-Length: 27\r\n\r\n{\"kernel_image_path\": \"/k\"}";
        for cut in 0..buf.len() {
            match parse(&buf[..cut], MAX) {
                Parsed::Partial { need, .. } => {
                    if let Some(n) = need {
                        assert_eq!(n, buf.len(), "cut at {cut}");
                    }
                }
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        let (r, _) = complete(buf);
        assert_eq!(r.body.len(), 27);
    }

    #[test]
    fn pipelined_requests_are_taken_one_at_a_time() {
        let buf = b"GET / HTTP/1.1\r\n\r\nPATCH /vm HTTP/1.1\r\nContent-Length: 19\r\n\r\n{\"state\":\"Paused\"} GET /version HTTP/1.1\r\n\r\n";
        let (a, n1) = complete(buf);
        assert_eq!(a.path, "/");
        let (b, n2) = complete(&buf[n1..]);
        assert_eq!((b.method.as_str(), b.body.len()), ("PATCH", 19));
        let (c, n3) = complete(&buf[n1 + n2..]);
        assert_eq!(c.path, "/version");
        assert_eq!(n1 + n2 + n3, buf.len());
    }

    #[test]
    fn bad_content_length() {
        for v in [
            "abc",
            "-1",
            "+5",
            "0x10",
            "5, 5",
            "",
            "99999999999999999999999999",
        ] {
            let req = format!("PUT /actions HTTP/1.1\r\nContent-Length: {v}\r\n\r\n");
            assert_eq!(error(req.as_bytes()).status, 400, "{v}");
        }
        let e = error(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n");
        assert!(e.message.contains("Conflicting"), "{e:?}");
        // The same length twice is harmless.
        complete(b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}");
    }

    #[test]
    fn payload_too_large_from_the_headers_alone() {
        let e = error(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n");
        assert_eq!(e.status, 413);
        assert!(
            e.message.contains("51201") && e.message.contains("51200"),
            "{e:?}"
        );
        let ok = format!("PUT /a HTTP/1.1\r\nContent-Length: {MAX}\r\n\r\n");
        assert_eq!(
            parse(ok.as_bytes(), MAX),
            Parsed::Partial {
                need: Some(ok.len() + MAX),
                expect_continue: false
            }
        );
    }

    #[test]
    fn chunked_and_other_encodings() {
        let e = error(
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        );
        assert_eq!(e.status, 411);
        let e = error(
            b"PUT /a HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 2\r\n\r\n{}",
        );
        assert_eq!(e.status, 411);
        assert_eq!(
            error(b"PUT /a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n").status,
            400
        );
        complete(b"PUT /a HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: 0\r\n\r\n");
    }

    #[test]
    fn keep_alive_rules() {
        assert!(
            !complete(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(!complete(b"GET / HTTP/1.0\r\n\r\n").0.keep_alive);
        assert!(
            complete(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn expect_continue() {
        let head = b"PUT /a HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(
            parse(head, MAX),
            Parsed::Partial {
                need: Some(head.len() + 5),
                expect_continue: true
            }
        );
        assert_eq!(error(b"GET / HTTP/1.1\r\nExpect: 42\r\n\r\n").status, 417);
    }

    #[test]
    fn garbage_and_limits() {
        assert_eq!(error(b"\x00\x01 nonsense\r\n\r\n").status, 400);
        assert_eq!(error(b"GET / HTTP/2.0\r\n\r\n").status, 400);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..40 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(error(&many).status, 400);
        let long = vec![b'a'; MAX_HEAD_BYTES + 1];
        assert_eq!(error(&long).status, 400);
        // Below the limit, an unfinished head is just partial.
        assert!(matches!(
            parse(b"GET /aaaa", MAX),
            Parsed::Partial { need: None, .. }
        ));
    }

    #[test]
    fn responses() {
        let mut out = Vec::new();
        write_response(&mut out, 204, None, false);
        assert_eq!(out, b"HTTP/1.1 204 No Content\r\nServer: ember API\r\n\r\n");
        out.clear();
        write_response(&mut out, 400, Some(&fault_body("bad \"x\"")), true);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{s}");
        assert!(s.contains("Connection: close\r\n"), "{s}");
        assert!(
            s.contains("Content-Type: application/json\r\nContent-Length: 29\r\n\r\n"),
            "{s}"
        );
        assert!(s.ends_with(r#"{"fault_message":"bad \"x\""}"#), "{s}");
    }
}
