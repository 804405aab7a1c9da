//! The guest's side of the MMDS: HTTP/1.x requests parsed from a connection's bytes, and
//! Firecracker's answers to them (status codes and plain-text messages).

use super::{Mmds, MmdsError, MmdsVersion, OutputFormat};

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];

/// One parsed request, borrowing the connection's buffer.
#[derive(Debug)]
pub struct Request<'a> {
    pub method: &'a str,
    pub uri: &'a str,
    pub http10: bool,
    pub headers: Vec<(&'a str, &'a str)>,
}

impl Request<'_> {
    fn header(&self, names: &[&str]) -> Option<(&str, &str)> {
        self.headers
            .iter()
            .find(|(k, _)| names.iter().any(|n| k.eq_ignore_ascii_case(n)))
            .copied()
    }

    /// Whether the connection closes after this request's answer.
    pub fn wants_close(&self) -> bool {
        match self.header(&["connection"]) {
            Some((_, v)) => v.trim().eq_ignore_ascii_case("close"),
            None => self.http10,
        }
    }
}

#[derive(Debug)]
pub enum Parse<'a> {
    /// More bytes are needed.
    Incomplete,
    /// A request, and how many bytes of the buffer it took (body included).
    Done(Request<'a>, usize),
    /// Not HTTP: answer 400 and close.
    Bad(&'static str),
}

pub fn parse(buf: &[u8]) -> Parse<'_> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Parse::Incomplete;
    };
    let Ok(head) = std::str::from_utf8(buf.get(..end).unwrap_or_default()) else {
        return Parse::Bad("Invalid request.");
    };
    let mut lines = head.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(uri), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Parse::Bad("Invalid request line.");
    };
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Parse::Bad("Unsupported HTTP version."),
    };
    let mut headers = Vec::new();
    let mut body_len = 0usize;
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            return Parse::Bad("Invalid header.");
        };
        let v = v.trim();
        if k.eq_ignore_ascii_case("content-length") {
            let Ok(n) = v.parse::<usize>() else {
                return Parse::Bad("Invalid Content-Length.");
            };
            body_len = n;
        }
        if k.eq_ignore_ascii_case("transfer-encoding") {
            return Parse::Bad("Transfer-Encoding is not supported.");
        }
        headers.push((k, v));
    }
    let Some(total) = (end + 4).checked_add(body_len) else {
        return Parse::Bad("Invalid Content-Length.");
    };
    if buf.len() < total {
        return Parse::Incomplete;
    }
    Parse::Done(
        Request {
            method,
            uri,
            http10,
            headers,
        },
        total,
    )
}

/// An answer before framing.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub json: bool,
    pub body: String,
    pub headers: Vec<(String, String)>,
}

fn text(status: u16, body: impl Into<String>) -> Response {
    Response {
        status,
        json: false,
        body: body.into(),
        headers: Vec::new(),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        501 => "Not Implemented",
        _ => "",
    }
}

impl Response {
    pub fn bad_request(msg: &str) -> Response {
        text(400, msg)
    }

    pub fn too_large() -> Response {
        text(413, "Request too large.")
    }

    /// The bytes on the wire.
    pub fn encode(&self, close: bool) -> Vec<u8> {
        let mut s = format!(
            "HTTP/1.1 {} {}\r\nServer: ember MMDS\r\nConnection: {}\r\nContent-Type: {}\r\n",
            self.status,
            reason(self.status),
            if close { "close" } else { "keep-alive" },
            if self.json {
                "application/json"
            } else {
                "text/plain"
            },
        );
        for (k, v) in &self.headers {
            s.push_str(&format!("{k}: {v}\r\n"));
        }
        s.push_str(&format!("Content-Length: {}\r\n\r\n", self.body.len()));
        let mut out = s.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

/// The path of the URI (absolute form and query dropped) with runs of `/` collapsed.
fn path_of(uri: &str) -> String {
    let mut p = uri;
    if let Some(rest) = p
        .strip_prefix("http://")
        .or_else(|| p.strip_prefix("HTTP://"))
    {
        p = rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("");
    }
    let p = p.split(['?', '#']).next().unwrap_or("");
    let mut out = String::with_capacity(p.len());
    for c in p.chars() {
        if c == '/' && out.ends_with('/') {
            continue;
        }
        out.push(c);
    }
    out
}

/// Firecracker's answer to one guest request.
pub fn respond(mmds: &mut Mmds, req: &Request) -> Response {
    let path = path_of(req.uri);
    if path.is_empty() {
        return text(400, "Invalid URI.");
    }
    match req.method {
        "GET" => {
            let token = req.header(&TOKEN_HEADERS);
            if mmds.version() == MmdsVersion::V2 {
                let Some((_, token)) = token else {
                    return text(
                        401,
                        "No MMDS token provided. Use `X-metadata-token` or \
                         `X-aws-ec2-metadata-token` header to specify the session token.",
                    );
                };
                if !mmds.is_valid_token(token) {
                    return text(401, "MMDS token not valid.");
                }
            }
            get(mmds, req, &path)
        }
        "PUT" => put_token(mmds, req, &path),
        _ => {
            let mut r = text(405, "Not allowed HTTP method.");
            r.headers.push(("Allow".into(), "GET, PUT".into()));
            r
        }
    }
}

fn get(mmds: &Mmds, req: &Request, path: &str) -> Response {
    let json = req
        .header(&["accept"])
        .is_some_and(|(_, v)| v.trim().eq_ignore_ascii_case("application/json"));
    let format = if json {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match mmds.get(path, format) {
        Ok(body) => Response {
            status: 200,
            json,
            body,
            headers: Vec::new(),
        },
        Err(MmdsError::NotFound) => text(404, format!("Resource not found: {}.", req.uri)),
        Err(e) => text(501, e.to_string()),
    }
}

fn put_token(mmds: &mut Mmds, req: &Request, path: &str) -> Response {
    if let Some((k, _)) = req.header(&["x-forwarded-for"]) {
        return text(
            400,
            format!("Invalid header. Reason: Unsupported header name. Key: {k}"),
        );
    }
    if path != TOKEN_PATH {
        return text(404, format!("Resource not found: {}.", req.uri));
    }
    let Some((k, v)) = req.header(&TTL_HEADERS) else {
        return text(
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = v.parse::<u32>() else {
        return text(
            400,
            format!("Invalid header. Reason: Invalid value. Key:{k}; Value:{v}"),
        );
    };
    match mmds.tokens().generate(ttl) {
        Ok(token) => {
            let mut r = text(200, token);
            r.headers.push((k.to_string(), ttl.to_string()));
            r
        }
        Err(e) => text(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(mmds: &mut Mmds, raw: &str) -> Response {
        match parse(raw.as_bytes()) {
            Parse::Done(r, n) => {
                assert_eq!(n, raw.len());
                respond(mmds, &r)
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    #[test]
    fn parsing() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\n"), Parse::Incomplete));
        assert!(matches!(parse(b"GET /\r\n\r\n"), Parse::Bad(_)));
        assert!(matches!(parse(b"GET / HTTP/2\r\n\r\n"), Parse::Bad(_)));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Parse::Incomplete
        ));
        assert!(matches!(
            parse(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
            Parse::Bad(_)
        ));
        let Parse::Done(r, n) = parse(b"GET /a HTTP/1.0\r\nX: y\r\n\r\nGET") else {
            panic!()
        };
        assert_eq!((r.method, r.uri, n), ("GET", "/a", 25));
        assert!(r.wants_close());
    }

    #[test]
    fn v1_and_v2() {
        let mut m = Mmds::new(1 << 16);
        m.put(json!({"latest": {"meta-data": {"id": "i-1"}}}))
            .unwrap();
        let r = req(&mut m, "GET //latest//meta-data/ HTTP/1.1\r\n\r\n");
        assert_eq!((r.status, r.body.as_str()), (200, "id"));
        let r = req(
            &mut m,
            "GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!(
            (r.status, r.body.as_str(), r.json),
            (200, r#"{"id":"i-1"}"#, true)
        );
        assert_eq!(req(&mut m, "GET /x HTTP/1.1\r\n\r\n").status, 404);
        assert_eq!(req(&mut m, "POST / HTTP/1.1\r\n\r\n").status, 405);
        m.configure(MmdsVersion::V2, false);
        assert_eq!(req(&mut m, "GET /latest HTTP/1.1\r\n\r\n").status, 401);
        let r = req(&mut m, "PUT /latest/api/token HTTP/1.1\r\n\r\n");
        assert_eq!(r.status, 400);
        let r = req(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        let ok = format!(
            "GET /latest HTTP/1.1\r\nX-metadata-token: {}\r\n\r\n",
            r.body
        );
        assert_eq!(req(&mut m, &ok).status, 200);
        let bad = "GET /latest HTTP/1.1\r\nX-metadata-token: 1234\r\n\r\n";
        assert_eq!(req(&mut m, bad).status, 401);
        let r = req(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n",
        );
        assert_eq!(r.status, 400);
        let r = req(
            &mut m,
            "PUT /latest/api/token HTTP/1.1\r\nX-Forwarded-For: a\r\n\
             X-metadata-token-ttl-seconds: 5\r\n\r\n",
        );
        assert_eq!(r.status, 400);
    }
}
