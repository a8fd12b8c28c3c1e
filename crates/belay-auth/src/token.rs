//! Bearer tokens: reading them from a file or the environment, checking them on the server
//! (interceptor or path-aware guard) and attaching them on the client.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::{Service, http};
use tonic::metadata::{Ascii, MetadataMap, MetadataValue};
use tonic::service::Interceptor;

use crate::AuthError;

/// The environment variable the binaries read the bearer token from.
pub const TOKEN_ENV: &str = "BELAY_TOKEN";

/// The gRPC health service's full name, for [`TokenCheck::exempt`].
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The `Unauthenticated` message for a call without a bearer token.
pub const MISSING_TOKEN_MESSAGE: &str = "missing bearer token: pass --token-file or BELAY_TOKEN";

/// The `Unauthenticated` message for a call with a wrong or malformed bearer token.
pub const INVALID_TOKEN_MESSAGE: &str = "invalid bearer token";

const AUTHORIZATION: &str = "authorization";

/// A secret string (a bearer token). `Debug` and `Display` print `***`; read it with
/// [`Secret::expose`] only where it is needed. Deliberately not `PartialEq`: compare tokens
/// with [`TokenCheck`], which does it in constant time.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Do not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Reads a secret: from `file` when given (its content, without trailing `\n`/`\r\n`),
/// otherwise from the environment variable `env_var`.
///
/// Returns `Ok(None)` when no file is given and the variable is unset or empty. A given file
/// that is missing, unreadable, not UTF-8 or empty is an error naming the file.
pub fn read_secret(env_var: &str, file: Option<&Path>) -> Result<Option<Secret>, AuthError> {
    if let Some(path) = file {
        let problem = |p: &str| AuthError::File {
            role: "token file",
            path: path.to_path_buf(),
            problem: p.to_owned(),
        };
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => problem("does not exist"),
            std::io::ErrorKind::PermissionDenied => problem("cannot be read: permission denied"),
            _ => problem(&format!("cannot be read: {e}")),
        })?;
        let text = String::from_utf8(bytes).map_err(|_| problem("is not valid UTF-8"))?;
        let token = text.trim_end_matches(['\n', '\r']);
        if token.is_empty() {
            return Err(problem("is empty"));
        }
        return Ok(Some(Secret(token.to_owned())));
    }
    match std::env::var(env_var) {
        Ok(value) => {
            let token = value.trim_end_matches(['\n', '\r']);
            Ok((!token.is_empty()).then(|| Secret(token.to_owned())))
        }
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(AuthError::EnvNotUnicode {
            var: env_var.to_owned(),
        }),
    }
}

/// Server-side bearer-token check.
///
/// As a tonic [`Interceptor`] it checks every call of the service it wraps (the exempt list
/// is ignored: interceptors do not see the path). [`TokenCheck::guard`] wraps a whole set of
/// routes instead and lets calls to exempt services through.
#[derive(Clone)]
pub struct TokenCheck {
    expected: Arc<Secret>,
    exempt: Arc<Vec<String>>,
}

impl fmt::Debug for TokenCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCheck")
            .field("expected", &self.expected)
            .field("exempt", &self.exempt)
            .finish()
    }
}

impl TokenCheck {
    /// A check that accepts exactly `authorization: Bearer <token>`.
    pub fn new(token: Secret) -> Self {
        Self {
            expected: Arc::new(token),
            exempt: Arc::new(Vec::new()),
        }
    }

    /// Lets calls to the gRPC service `service` (full name, e.g. [`HEALTH_SERVICE`]) through
    /// without a token. Only [`TokenCheck::guard`] honours this.
    pub fn exempt(mut self, service: impl Into<String>) -> Self {
        Arc::make_mut(&mut self.exempt).push(service.into());
        self
    }

    /// Whether a request to the HTTP/2 `path` (`/package.Service/Method`) skips the check.
    pub fn is_exempt(&self, path: &str) -> bool {
        let service = path
            .strip_prefix('/')
            .unwrap_or(path)
            .split('/')
            .next()
            .unwrap_or_default();
        self.exempt.iter().any(|e| e == service)
    }

    /// Checks the `authorization` metadata; the error is the `Unauthenticated` status to
    /// return to the caller.
    pub fn check(&self, metadata: &MetadataMap) -> Result<(), Status> {
        self.verify(metadata.get(AUTHORIZATION).map(|v| v.to_str().ok()))
    }

    /// Checks an HTTP request's `Authorization` header (`None`: absent), for the routes a
    /// daemon serves over plain HTTP (the controller's webhooks); the error is the message
    /// to answer 401 with.
    pub fn check_http(&self, header: Option<&[u8]>) -> Result<(), String> {
        self.verify(header.map(|v| std::str::from_utf8(v).ok()))
            .map_err(|status| status.message().to_string())
    }

    /// `header` is `None` when absent, `Some(None)` when present but not visible ASCII.
    fn verify(&self, header: Option<Option<&str>>) -> Result<(), Status> {
        let Some(value) = header else {
            return Err(Status::unauthenticated(MISSING_TOKEN_MESSAGE));
        };
        let presented = value
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| token.trim_start_matches(' '))
            })
            .ok_or_else(|| Status::unauthenticated(INVALID_TOKEN_MESSAGE))?;
        if constant_time_eq(presented.as_bytes(), self.expected.expose().as_bytes()) {
            Ok(())
        } else {
            Err(Status::unauthenticated(INVALID_TOKEN_MESSAGE))
        }
    }

    /// Wraps `inner` (typically a server's [`tonic::service::Routes`], or a single service)
    /// so every call is checked except those to exempt services.
    pub fn guard<S>(self, inner: S) -> TokenGuard<S> {
        TokenGuard { inner, check: self }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        self.check(request.metadata())?;
        Ok(request)
    }
}

/// A token check that may be switched off: servers wrap every protected service with it
/// whether or not a token is configured, so the service types do not depend on the
/// configuration. Health stays unwrapped, and thus open.
#[derive(Clone, Debug, Default)]
pub struct MaybeTokenCheck(pub Option<TokenCheck>);

impl Interceptor for MaybeTokenCheck {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        match &self.0 {
            Some(check) => check.check(request.metadata()).map(|()| request),
            None => Ok(request),
        }
    }
}

/// A client token that may be absent, so clients have one type either way (the client
/// side of [`MaybeTokenCheck`]).
#[derive(Clone, Debug, Default)]
pub struct MaybeTokenAttach(pub Option<TokenAttach>);

impl Interceptor for MaybeTokenAttach {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        match &mut self.0 {
            Some(attach) => attach.call(request),
            None => Ok(request),
        }
    }
}

/// Compares in time that depends only on the length of `presented`, never on where the
/// first difference is (the expected token's length may still be inferable, as with any
/// length-checking comparison).
fn constant_time_eq(presented: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(presented.len() != expected.len());
    for (i, byte) in presented.iter().enumerate() {
        let other = expected.get(i).copied().unwrap_or(!*byte);
        diff |= byte ^ other;
    }
    std::hint::black_box(diff) == 0
}

/// A tower service checking bearer tokens in front of `S`, with per-service exemptions.
/// Built by [`TokenCheck::guard`].
#[derive(Debug, Clone)]
pub struct TokenGuard<S> {
    inner: S,
    check: TokenCheck,
}

impl<S, B, R> Service<http::Request<B>> for TokenGuard<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = GuardFuture<S::Future, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !self.check.is_exempt(req.uri().path()) {
            let header = req.headers().get(AUTHORIZATION).map(|v| v.to_str().ok());
            if let Err(status) = self.check.verify(header) {
                return GuardFuture {
                    kind: GuardKind::Rejected(Some(status)),
                    _body: PhantomData,
                };
            }
        }
        GuardFuture {
            kind: GuardKind::Inner(Box::pin(self.inner.call(req))),
            _body: PhantomData,
        }
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for TokenGuard<S> {
    const NAME: &'static str = S::NAME;
}

/// The response future of [`TokenGuard`].
pub struct GuardFuture<F, R> {
    kind: GuardKind<F>,
    _body: PhantomData<fn() -> R>,
}

enum GuardKind<F> {
    Inner(Pin<Box<F>>),
    Rejected(Option<Status>),
}

impl<F, R> fmt::Debug for GuardFuture<F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            GuardKind::Inner(_) => "Inner",
            GuardKind::Rejected(_) => "Rejected",
        };
        f.debug_struct("GuardFuture").field("kind", &kind).finish()
    }
}

impl<F, R, E> Future for GuardFuture<F, R>
where
    F: Future<Output = Result<http::Response<R>, E>>,
    R: Default,
{
    type Output = Result<http::Response<R>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.get_mut().kind {
            GuardKind::Inner(fut) => fut.as_mut().poll(cx),
            GuardKind::Rejected(status) => {
                let status = status
                    .take()
                    .unwrap_or_else(|| Status::internal("token guard polled after completion"));
                Poll::Ready(Ok(status.into_http()))
            }
        }
    }
}

/// Client-side interceptor that adds `authorization: Bearer <token>` to every call.
/// The header value is marked sensitive (not HPACK-indexed, redacted in `Debug`).
#[derive(Clone)]
pub struct TokenAttach {
    value: MetadataValue<Ascii>,
}

impl fmt::Debug for TokenAttach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenAttach")
            .field("value", &"Bearer ***")
            .finish()
    }
}

impl TokenAttach {
    /// Fails when the token holds characters an HTTP header cannot carry.
    pub fn new(token: &Secret) -> Result<Self, AuthError> {
        let token = token.expose();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthError::TokenNotHeaderSafe);
        }
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| AuthError::TokenNotHeaderSafe)?;
        value.set_sensitive(true);
        Ok(Self { value })
    }
}

impl Interceptor for TokenAttach {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        request
            .metadata_mut()
            .insert(AUTHORIZATION, self.value.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints() {
        let secret = Secret::new("hunter2-very-secret");
        assert!(!format!("{secret:?}").contains("hunter2"));
        assert!(!format!("{secret}").contains("hunter2"));
        assert!(!format!("{:?}", Some(&secret)).contains("hunter2"));
        let check = TokenCheck::new(secret.clone());
        assert!(!format!("{check:?}").contains("hunter2"));
        let attach = TokenAttach::new(&secret).expect("header-safe token");
        assert!(!format!("{attach:?}").contains("hunter2"));
        assert_eq!(secret.expose(), "hunter2-very-secret");
    }

    #[test]
    fn read_secret_prefers_the_file_and_trims_the_newline() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\r\n").expect("writable");
        // PATH is always set; the file still wins.
        let secret = read_secret("PATH", Some(&path))
            .expect("readable")
            .expect("present");
        assert_eq!(secret.expose(), "s3cret");

        std::fs::write(&path, "\n").expect("writable");
        let err = read_secret("PATH", Some(&path)).expect_err("empty file");
        assert!(err.to_string().contains("is empty"), "{err}");

        let err = read_secret("PATH", Some(&dir.path().join("missing"))).expect_err("missing");
        let msg = err.to_string();
        assert!(
            msg.contains("token file") && msg.contains("does not exist"),
            "{msg}"
        );

        let from_env = read_secret("PATH", None).expect("readable").expect("set");
        assert_eq!(
            from_env.expose(),
            std::env::var("PATH").expect("PATH is set")
        );
        assert!(
            read_secret("BELAY_AUTH_TEST_SURELY_UNSET_VARIABLE", None)
                .expect("unset is fine")
                .is_none()
        );
    }

    #[test]
    fn check_accepts_only_the_exact_bearer_token() {
        let check = TokenCheck::new(Secret::new("abc123"));
        let with = |v: &str| {
            let mut md = MetadataMap::new();
            md.insert(AUTHORIZATION, v.parse().expect("ascii"));
            check.check(&md)
        };
        let err = check.check(&MetadataMap::new()).expect_err("no header");
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        assert_eq!(err.message(), MISSING_TOKEN_MESSAGE);
        assert!(with("Bearer abc123").is_ok());
        assert!(with("bearer abc123").is_ok());
        for wrong in [
            "Bearer abc12",
            "Bearer abc1234",
            "Bearer ABC123",
            "Basic abc123",
            "abc123",
            "Bearer ",
        ] {
            let err = with(wrong).expect_err(wrong);
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{wrong}");
            assert_eq!(err.message(), INVALID_TOKEN_MESSAGE, "{wrong}");
        }
    }

    #[test]
    fn constant_time_eq_is_correct() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
    }

    #[test]
    fn exemptions_match_whole_service_names() {
        let check = TokenCheck::new(Secret::new("t")).exempt(HEALTH_SERVICE);
        assert!(check.is_exempt("/grpc.health.v1.Health/Check"));
        assert!(check.is_exempt("/grpc.health.v1.Health/Watch"));
        assert!(!check.is_exempt("/grpc.health.v1.HealthX/Check"));
        assert!(!check.is_exempt("/belay.v1.Controller/Deploy"));
        assert!(!TokenCheck::new(Secret::new("t")).is_exempt("/grpc.health.v1.Health/Check"));
    }

    #[test]
    fn attach_rejects_tokens_that_are_not_header_safe() {
        assert!(TokenAttach::new(&Secret::new("has space")).is_err());
        assert!(TokenAttach::new(&Secret::new("ünïcode")).is_err());
        assert!(TokenAttach::new(&Secret::new("")).is_err());
        assert!(TokenAttach::new(&Secret::new("ok-token_123")).is_ok());
    }
}
