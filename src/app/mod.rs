//! The applications: the API (the healthcheck) and the admin listener's probes. The router maps
//! a method and target to a route, the handlers turn a route into a response. Handlers never
//! block: a slow one (the healthcheck delay) names a deadline.

mod healthcheck;

use std::time::Duration;

use serde::Serialize;

use crate::config::Environment;
use crate::exposition::{Exposition, PROMETHEUS_TEXT, ProcessView};
use crate::http::{Persistence, ResponseHead, Status, encode, encode_raw};

/// The path of the only resource.
pub const HEALTHCHECK_PATH: &str = "/v1/healthcheck";

/// The admin listener's readiness probe.
pub const READYZ_PATH: &str = "/readyz";

/// The admin listener's liveness probe.
pub const LIVEZ_PATH: &str = "/livez";

/// The admin listener's Prometheus metrics.
pub const METRICS_PATH: &str = "/metrics";

/// The admin listener's expvar-style counters (the book's `/debug/vars`).
pub const DEBUG_VARS_PATH: &str = "/debug/vars";

/// The methods every resource allows, for the `Allow` header of a 405.
const ALLOW: &str = "GET, HEAD";

/// What the router decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET` or `HEAD /v1/healthcheck` (API).
    Healthcheck,
    /// `GET` or `HEAD /readyz` (admin).
    Readyz,
    /// `GET` or `HEAD /livez` (admin).
    Livez,
    /// `GET` or `HEAD /metrics` (admin).
    Metrics,
    /// `GET` or `HEAD /debug/vars` (admin).
    DebugVars,
    /// A path no route serves.
    NotFound,
    /// A known path with a method it does not allow; carries the method for the message.
    MethodNotAllowed(Box<str>),
}

/// A routed request: the route and whether the body must be left out (HEAD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    /// The route.
    pub route: Route,
    /// The request was HEAD: same headers, no body.
    pub head_only: bool,
}

/// The application a listener serves, and the state its handlers read.
#[derive(Debug, Clone)]
pub struct App {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    /// The book's API: fixed for the life of the process.
    Api {
        environment: Environment,
        healthcheck_delay: Duration,
    },
    /// The admin listener: the probes' answers and what the scrapes read, kept current by the
    /// supervisor.
    Admin(Box<AdminState>),
}

#[derive(Debug, Clone)]
struct AdminState {
    probes: Probes,
    exposition: Exposition,
}

/// What the admin probes answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probes {
    /// Serving (not in the lame duck or the drain): `/readyz` is 200, else 503 `draining`.
    pub ready: bool,
    /// Every loop of the process is turning: `/livez` is 200, else 503 `stalled`.
    pub alive: bool,
}

/// The body of a probe's answer.
#[derive(Serialize)]
struct ProbeBody {
    status: &'static str,
}

/// The JSON body of every error response.
#[derive(Serialize)]
pub struct ErrorBody<'a> {
    /// What went wrong, for people.
    pub error: &'a str,
}

/// The 405 message, serialized without building a `String`.
struct MethodNotAllowedBody<'a>(&'a str);

impl Serialize for MethodNotAllowedBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let message = format_args!("the {} method is not supported for this resource", self.0);
        let mut body = serializer.serialize_struct("ErrorBody", 1)?;
        body.serialize_field("error", &Message(message))?;
        body.end()
    }
}

/// A formatted message serialized as a JSON string straight from its `fmt::Arguments`.
struct Message<'a>(std::fmt::Arguments<'a>);

impl Serialize for Message<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&self.0)
    }
}

impl App {
    /// The API for an environment, with the healthcheck answering after `delay`.
    pub fn api(environment: Environment, healthcheck_delay: Duration) -> App {
        App {
            kind: Kind::Api {
                environment,
                healthcheck_delay,
            },
        }
    }

    /// The admin listener's application, reading `exposition` for its scrapes: ready and
    /// alive until told otherwise.
    pub fn admin(exposition: Exposition) -> App {
        App {
            kind: Kind::Admin(Box::new(AdminState {
                probes: Probes {
                    ready: true,
                    alive: true,
                },
                exposition,
            })),
        }
    }

    /// Updates what the admin probes and scrapes answer (nothing for the API).
    pub fn set_state(&mut self, probes: Probes, view: ProcessView) {
        if let Kind::Admin(state) = &mut self.kind {
            state.probes = probes;
            state.exposition.view = view;
        }
    }

    /// Maps a method and request target to a route. The query string is ignored, and the
    /// absolute form (`http://host/path`, RFC 9112 §3.2.2) is accepted.
    pub fn route(&self, method: &str, target: &str) -> Routed {
        let path = path_of(target);
        let head_only = method == "HEAD";
        let found = match (&self.kind, path) {
            (Kind::Api { .. }, HEALTHCHECK_PATH) => Some(Route::Healthcheck),
            (Kind::Admin(_), READYZ_PATH) => Some(Route::Readyz),
            (Kind::Admin(_), LIVEZ_PATH) => Some(Route::Livez),
            (Kind::Admin(_), METRICS_PATH) => Some(Route::Metrics),
            (Kind::Admin(_), DEBUG_VARS_PATH) => Some(Route::DebugVars),
            _ => None,
        };
        let route = match found {
            None => Route::NotFound,
            Some(route) if method == "GET" || head_only => route,
            Some(_) => Route::MethodNotAllowed(method.into()),
        };
        Routed { route, head_only }
    }

    /// How long the handler for `route` takes before its response is due.
    pub fn delay(&self, route: &Route) -> Duration {
        match (&self.kind, route) {
            (
                Kind::Api {
                    healthcheck_delay, ..
                },
                Route::Healthcheck,
            ) => *healthcheck_delay,
            _ => Duration::ZERO,
        }
    }

    /// Runs the handler for a routed request, appends its response to `out`, and returns
    /// its status.
    pub fn respond(
        &self,
        routed: &Routed,
        persistence: Persistence,
        date: &[u8],
        out: &mut Vec<u8>,
    ) -> Status {
        let head = |status, allow| ResponseHead {
            status,
            persistence,
            allow,
            head_only: routed.head_only,
        };
        let probe = |up: bool, good: &'static str, bad: &'static str| {
            if up {
                (Status::Ok, ProbeBody { status: good })
            } else {
                (Status::ServiceUnavailable, ProbeBody { status: bad })
            }
        };
        let admin = match &self.kind {
            Kind::Admin(state) => Some(state.as_ref()),
            Kind::Api { .. } => None,
        };
        match (&routed.route, admin) {
            (Route::Healthcheck, _) => {
                let environment = match self.kind {
                    Kind::Api { environment, .. } => environment,
                    Kind::Admin(_) => Environment::Development,
                };
                let body = healthcheck::report(environment);
                encode(out, &head(Status::Ok, None), date, &body);
                Status::Ok
            }
            (Route::Readyz, Some(state)) => {
                let (status, body) = probe(state.probes.ready, "ready", "draining");
                encode(out, &head(status, None), date, &body);
                status
            }
            (Route::Livez, Some(state)) => {
                let (status, body) = probe(state.probes.alive, "alive", "stalled");
                encode(out, &head(status, None), date, &body);
                status
            }
            (Route::Metrics, Some(state)) => {
                let text = state.exposition.prometheus();
                let head = head(Status::Ok, None);
                encode_raw(out, &head, date, PROMETHEUS_TEXT, text.as_bytes());
                Status::Ok
            }
            (Route::DebugVars, Some(state)) => {
                let vars = state.exposition.debug_vars();
                encode(out, &head(Status::Ok, None), date, &vars);
                Status::Ok
            }
            (Route::MethodNotAllowed(method), _) => {
                let head = head(Status::MethodNotAllowed, Some(ALLOW));
                encode(out, &head, date, &MethodNotAllowedBody(method));
                Status::MethodNotAllowed
            }
            (
                Route::NotFound | Route::Readyz | Route::Livez | Route::Metrics | Route::DebugVars,
                _,
            ) => {
                let body = ErrorBody {
                    error: "the requested resource could not be found",
                };
                encode(out, &head(Status::NotFound, None), date, &body);
                Status::NotFound
            }
        }
    }
}

/// The path of a request target: origin form as is, absolute form without scheme and
/// authority, the query dropped.
fn path_of(target: &str) -> &str {
    let path = if target.starts_with('/') {
        target
    } else {
        match target.split_once("://") {
            Some((scheme, rest)) if !scheme.contains('/') => {
                rest.find('/').and_then(|i| rest.get(i..)).unwrap_or("/")
            }
            _ => target,
        }
    };
    match path.bytes().position(|b| b == b'?') {
        Some(query) => path.get(..query).unwrap_or(path),
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App::api(Environment::Development, Duration::ZERO)
    }

    #[test]
    fn routing_table() {
        let rows: &[(&str, &str, Route)] = &[
            ("GET", "/v1/healthcheck", Route::Healthcheck),
            ("HEAD", "/v1/healthcheck", Route::Healthcheck),
            ("GET", "/v1/healthcheck?verbose=1", Route::Healthcheck),
            (
                "GET",
                "http://example.com/v1/healthcheck",
                Route::Healthcheck,
            ),
            ("GET", "/v1/healthcheck/", Route::NotFound),
            ("GET", "/", Route::NotFound),
            ("GET", "/v1/HEALTHCHECK", Route::NotFound),
            (
                "POST",
                "/v1/healthcheck",
                Route::MethodNotAllowed("POST".into()),
            ),
            (
                "get",
                "/v1/healthcheck",
                Route::MethodNotAllowed("get".into()),
            ),
            ("POST", "/nowhere", Route::NotFound),
        ];
        for (method, target, route) in rows {
            assert_eq!(
                &app().route(method, target).route,
                route,
                "{method} {target}"
            );
        }
    }

    fn body_of(method: &str, target: &str) -> serde_json::Value {
        let app = app();
        let mut out = Vec::new();
        let routed = app.route(method, target);
        app.respond(&routed, Persistence::KeepAlive, b"date", &mut out);
        let text = String::from_utf8(out).unwrap();
        let (_, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            body.ends_with("}\n"),
            "pretty body ends in a newline: {body:?}"
        );
        serde_json::from_str(body).unwrap()
    }

    #[test]
    fn healthcheck_reports_status_environment_and_version() {
        let body = body_of("GET", "/v1/healthcheck");
        assert_eq!(
            body,
            serde_json::json!({
                "status": "available",
                "system_info": {"environment": "development", "version": env!("CARGO_PKG_VERSION")}
            })
        );
    }

    #[test]
    fn method_not_allowed_names_the_method() {
        let body = body_of("DELETE", "/v1/healthcheck");
        assert_eq!(
            body,
            serde_json::json!({"error": "the DELETE method is not supported for this resource"})
        );
    }
}
