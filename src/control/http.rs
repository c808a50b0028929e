//! The control socket's HTTP face: JSON over HTTP/1.1 on `CACHE/control.sock`, one request
//! per connection.
//!
//! - `GET /status` (`?dirty=true` for the dirty set): the [`super::Status`] document,
//!   `schema` [`super::STATUS_SCHEMA`] (docs/status.md);
//! - `POST /sync`, `POST /snapshot`, `POST /rollback`, `POST /unmount`: the body is the
//!   request's fields as JSON (`{"timeout_secs": 60}`, `{"name": "x"}`, ...; empty for the
//!   defaults).
//!
//! The answer is the same JSON as the line protocol's, with 200 when `ok` is true and 4xx/5xx
//! with the typed error otherwise, e.g.
//! `curl --unix-socket CACHE/control.sock http://owsfs/status`.

use std::io::{BufRead, Read, Write};

use super::{ControlError, Request, Response};

/// The longest body a request may have.
const MAX_BODY: usize = 64 << 10;

/// The longest request line or header line.
const MAX_LINE: u64 = 8 << 10;

/// Reads one line of at most [`MAX_LINE`] bytes.
fn line(reader: &mut impl BufRead) -> Result<String, String> {
    let mut h = String::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE)
        .read_line(&mut h)
        .map_err(|e| e.to_string())?;
    if n as u64 == MAX_LINE && !h.ends_with('\n') {
        return Err("a header line is too long".into());
    }
    Ok(h)
}

/// Whether `line` starts an HTTP request (else it is a line of the JSON protocol).
pub fn is_request_line(line: &str) -> bool {
    let mut parts = line.split_whitespace();
    matches!(
        parts.next(),
        Some("GET" | "POST" | "HEAD" | "PUT" | "DELETE")
    ) && parts.next().is_some_and(|p| p.starts_with('/'))
        && parts.next().is_some_and(|v| v.starts_with("HTTP/1."))
}

/// A request refused before it was understood: the HTTP status, and why.
#[derive(Debug)]
pub struct Refusal {
    pub status: &'static str,
    pub message: String,
}

impl From<String> for Refusal {
    fn from(message: String) -> Refusal {
        Refusal {
            status: "400 Bad Request",
            message,
        }
    }
}

impl From<&str> for Refusal {
    fn from(message: &str) -> Refusal {
        message.to_string().into()
    }
}

/// Reads the rest of the request whose first line is `first`, and makes it a [`Request`].
pub fn read_request(first: &str, reader: &mut impl BufRead) -> Result<Request, Refusal> {
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut length = 0usize;
    loop {
        let h = line(reader)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v
                    .trim()
                    .parse()
                    .map_err(|_| "bad Content-Length".to_string())?;
            } else if k.eq_ignore_ascii_case("transfer-encoding") {
                return Err("send the body with a Content-Length, not a Transfer-Encoding".into());
            }
        }
    }
    if length > MAX_BODY {
        return Err(format!("a body of {length} bytes is too long").into());
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let cmd = path.trim_start_matches('/');
    let mut fields = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::Map::new()
    } else {
        match serde_json::from_slice::<serde_json::Value>(&body) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => return Err("the body must be a JSON object".into()),
        }
    };
    match (method, cmd) {
        ("GET", "status") => {
            for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                match kv.split_once('=').unwrap_or((kv, "true")) {
                    ("dirty", v) => {
                        fields.insert("dirty".into(), (v == "true" || v == "1").into());
                    }
                    (k, _) => {
                        return Err(format!("unknown parameter {k:?} (known: dirty)").into());
                    }
                }
            }
        }
        ("POST", "sync" | "snapshot" | "rollback" | "unmount" | "restart") => {}
        (_, "status" | "sync" | "snapshot" | "rollback" | "unmount" | "restart") => {
            return Err(Refusal {
                status: "405 Method Not Allowed",
                message: format!("{method} /{cmd}: use GET /status, or POST for the others"),
            });
        }
        _ => {
            return Err(Refusal {
                status: "404 Not Found",
                message: format!(
                    "no such resource: {path} (known: /status, /sync, /snapshot, /rollback, \
                     /unmount, /restart)"
                ),
            });
        }
    }
    let known: &[&str] = match cmd {
        "status" => &["dirty"],
        "sync" => &["timeout_secs"],
        "snapshot" => &["name", "timeout_secs"],
        "rollback" => &["to", "keep_snapshots", "timeout_secs"],
        "restart" => &[],
        _ => &["lazy"],
    };
    if let Some(k) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!(
            "unknown field {k:?} for /{cmd} (known: {})",
            known.join(", ")
        )
        .into());
    }
    fields.insert("cmd".into(), cmd.into());
    serde_json::from_value(serde_json::Value::Object(fields)).map_err(|e| e.to_string().into())
}

/// Writes `reply` as an HTTP response; `status`: the HTTP status of a [`Refusal`], else the
/// one the reply's error kind maps to.
pub fn write_response(
    w: &mut impl Write,
    reply: &Response,
    status: Option<&str>,
) -> std::io::Result<()> {
    let status = status.unwrap_or(match reply {
        Response::Ok(_) => "200 OK",
        Response::Err(f) => match &f.error {
            ControlError::BadRequest(_) => "400 Bad Request",
            ControlError::Busy(_) => "409 Conflict",
            ControlError::ShuttingDown => "503 Service Unavailable",
            ControlError::NotDurable { .. } => "504 Gateway Timeout",
            ControlError::Unmount(_) | ControlError::Other(_) => "500 Internal Server Error",
        },
    });
    let body = serde_json::to_string(reply).map_err(std::io::Error::other)?;
    write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// The client's side: `req` as an HTTP request.
pub fn write_request(w: &mut impl Write, req: &Request) -> std::io::Result<()> {
    let mut v = serde_json::to_value(req).map_err(std::io::Error::other)?;
    let cmd = v
        .as_object_mut()
        .and_then(|o| o.remove("cmd"))
        .and_then(|c| c.as_str().map(str::to_string))
        .unwrap_or_default();
    let (method, target, body) = match req {
        Request::Status { dirty } => ("GET", format!("/status?dirty={dirty}"), String::new()),
        _ => ("POST", format!("/{cmd}"), v.to_string()),
    };
    write!(
        w,
        "{method} {target} HTTP/1.1\r\nHost: owsfs\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    w.flush()
}

/// The client's side: the body of an HTTP response (any status: the JSON says how it went).
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut status = String::new();
    if reader.read_line(&mut status)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if status.starts_with('{') {
        // A daemon from before HTTP answers in the line protocol (see `client`).
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            LineAnswer(status),
        ));
    }
    if !status.starts_with("HTTP/1.") {
        return Err(std::io::Error::other(format!(
            "not an HTTP answer: {status:?}"
        )));
    }
    let mut length = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse::<usize>().ok();
        }
    }
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            reader.read_exact(&mut body)?;
        }
        None => {
            reader.read_to_end(&mut body)?;
        }
    }
    String::from_utf8(body).map_err(std::io::Error::other)
}

/// The answer of a daemon that speaks only the line protocol (it could not parse an HTTP
/// request, and said so in a JSON line).
#[derive(Debug)]
pub struct LineAnswer(pub String);

impl std::fmt::Display for LineAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a line-protocol answer: {}", self.0.trim())
    }
}

impl std::error::Error for LineAnswer {}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Request, String> {
        parse_refusal(raw).map_err(|r| r.message)
    }

    fn parse_refusal(raw: &str) -> Result<Request, Refusal> {
        let mut r = std::io::BufReader::new(raw.as_bytes());
        let mut first = String::new();
        r.read_line(&mut first).unwrap();
        assert!(is_request_line(&first), "{first}");
        read_request(&first, &mut r)
    }

    #[test]
    fn requests_round_trip_through_http() {
        for req in [
            Request::Status { dirty: true },
            Request::Status { dirty: false },
            Request::Sync { timeout_secs: 12.5 },
            Request::Snapshot {
                name: "before".into(),
                timeout_secs: 300.0,
            },
            Request::Unmount { lazy: true },
        ] {
            let mut wire = Vec::new();
            write_request(&mut wire, &req).unwrap();
            assert_eq!(parse(&String::from_utf8(wire).unwrap()).unwrap(), req);
        }
        assert_eq!(
            parse("POST /sync HTTP/1.1\r\nContent-Length: 0\r\n\r\n").unwrap(),
            Request::Sync {
                timeout_secs: 300.0
            }
        );
        assert!(
            parse("GET /nothing HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .contains("no such")
        );
        assert!(parse("POST /status HTTP/1.1\r\n\r\n").is_err());
        let status = |raw: &str| parse_refusal(raw).unwrap_err().status;
        assert_eq!(status("GET /nothing HTTP/1.1\r\n\r\n"), "404 Not Found");
        assert_eq!(
            status("DELETE /sync HTTP/1.1\r\n\r\n"),
            "405 Method Not Allowed"
        );
        assert_eq!(
            status("GET /status?x=1 HTTP/1.1\r\n\r\n"),
            "400 Bad Request"
        );
        assert!(!is_request_line("{\"cmd\":\"status\"}"));
        // What is not understood is refused, not half done.
        assert!(parse("POST /unmount HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        let typo = "POST /sync HTTP/1.1\r\nContent-Length: 17\r\n\r\n{\"timeot_secs\":1}";
        assert!(parse(typo).unwrap_err().contains("timeot_secs"));
        let long = format!("GET /status HTTP/1.1\r\nX: {}\r\n\r\n", "x".repeat(10_000));
        assert!(parse(&long).unwrap_err().contains("too long"));
        // A daemon from before HTTP answers with a JSON line: the client can tell.
        let e = read_response(&mut std::io::BufReader::new(&b"{\"ok\":false}\n"[..])).unwrap_err();
        assert!(e.get_ref().is_some_and(|i| i.is::<LineAnswer>()));
    }
}
