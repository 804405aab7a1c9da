//! One whole request in, one response out: route it to an `Action`, have the VMM thread
//! apply it, and turn the result into a status and Firecracker's JSON body.

use super::http::{Request, fault_body};
use super::routes;
use crate::action::{ActionOk, ActionResult, ActionSender};

/// A response before framing: the status and, unless it is 204, a JSON body.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Response {
    pub status: u16,
    pub body: Option<String>,
}

/// Answers one request. Blocks while the VMM thread applies the action (the API thread
/// serves one request at a time, as the VMM applies one action at a time).
pub(super) fn handle(request: &Request, sender: &ActionSender) -> Response {
    log::info!(
        "The API server received a {} request on {}.",
        request.method,
        request.path
    );
    if request.path == "/ember-test-panic" {
        crate::seccomp::test_panic(crate::seccomp::ThreadKind::Api);
    }
    if !request.body.is_empty() {
        log::debug!("Request body: {}", String::from_utf8_lossy(&request.body));
    }
    let result = routes::route(&request.method, &request.path, &request.body)
        .and_then(|action| sender.call(action));
    if let Err(e) = &result {
        log::warn!(
            "API {} {} failed ({}): {}",
            request.method,
            request.path,
            e.status,
            e.message
        );
    }
    response(result)
}

fn response(result: ActionResult) -> Response {
    match result {
        Ok(ActionOk::NoContent) => Response {
            status: 204,
            body: None,
        },
        Ok(ActionOk::Json(body)) => Response {
            status: 200,
            body: Some(body),
        },
        Err(e) => Response {
            // A status outside the error range would confuse clients into success.
            status: if (400..=599).contains(&e.status) {
                e.status
            } else {
                500
            },
            body: Some(fault_body(&e.message)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::action::ActionError;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    #[test]
    fn results_become_statuses_and_bodies() {
        assert_eq!(response(Ok(ActionOk::NoContent)).status, 204);
        let r = response(Ok(ActionOk::Json("{}".into())));
        assert_eq!((r.status, r.body.as_deref()), (200, Some("{}")));
        let r = response(Err(ActionError::bad_request("no \"kernel\"")));
        assert_eq!(r.status, 400);
        assert_eq!(
            r.body.as_deref(),
            Some(r#"{"fault_message":"no \"kernel\""}"#)
        );
        for odd in [0, 200, 204, 302, 600] {
            let e = ActionError {
                status: odd,
                message: "x".into(),
            };
            assert_eq!(response(Err(e)).status, 500, "{odd}");
        }
    }

    #[test]
    fn routing_errors_never_reach_the_vmm() {
        let (sender, receiver) = crate::action::channel().unwrap();
        let r = handle(&req("GET", "/pmem/p0", ""), &sender);
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().contains("pmem"));
        let r = handle(
            &req("PUT", "/machine-config", "{\"vcpu_count\": true}"),
            &sender,
        );
        assert_eq!(r.status, 400);
        assert!(receiver.rx.try_recv().is_err());
    }

    #[test]
    fn a_stopped_vmm_is_an_error_not_a_hang() {
        let (sender, receiver) = crate::action::channel().unwrap();
        drop(receiver);
        let r = handle(&req("GET", "/", ""), &sender);
        assert_eq!(r.status, 500);
    }
}
