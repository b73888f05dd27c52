//! The HTTP API: accounts, conversations, history, receipts, health and metrics.
//!
//! Handlers parse and validate, then call entities through the router; they hold no
//! state of their own. JSON bodies are read with an explicit cap and parsed whatever
//! the `Content-Type`, so every failure has the contract's error shape.

use std::collections::HashMap;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{web, FromRequest, HttpRequest, HttpResponse, ResponseError};
use futures_util::future::{join_all, LocalBoxFuture};
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::api::ApiError;
use super::protocol::{MessageJson, UserJson};
use super::ws;
use super::AppState;
use crate::actors::{auth, *};
use crate::ids::{ConversationId, GroupId, UserId};
use crate::metrics::metrics;

/// Default and largest page of `GET .../messages`.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;
const MAX_PASSWORD_BYTES: usize = 1024;
const MAX_DISPLAY_NAME_CHARS: usize = 64;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/metrics", web::get().to(metrics_text))
        .service(resource("/admin/cluster").get(admin_cluster))
        .service(resource("/admin/reload").post(admin_reload))
        .service(resource("/admin/chaos/kill").post(chaos_kill))
        .service(resource("/admin/chaos/partition").post(chaos_partition))
        .service(resource("/admin/chaos/storage").post(chaos_storage))
        .service(
            web::scope("/api/v1")
                .service(resource("/users").get(find_user).post(register))
                .service(resource("/users/me").get(me))
                .service(resource("/users/{user_id}").get(user))
                .service(resource("/users/{user_id}/keys").get(claim_keys))
                .service(resource("/keys").put(put_keys))
                .service(resource("/media").post(upload_media))
                .service(resource("/media/{media_id}").get(download_media))
                .service(resource("/sessions").post(login))
                .service(resource("/sessions/current").delete(logout))
                .service(resource("/contacts").get(contacts))
                .service(
                    resource("/contacts/{user_id}")
                        .put(add_contact)
                        .delete(remove_contact),
                )
                .service(resource("/groups").post(create_group))
                .service(resource("/groups/{gid}").get(group))
                .service(resource("/groups/{gid}/members").post(add_member))
                .service(resource("/groups/{gid}/members/{user_id}").delete(remove_member))
                .service(resource("/conversations").get(conversations))
                .service(resource("/conversations/{cid}/messages").get(history))
                .service(resource("/conversations/{cid}/receipts").get(receipts))
                .service(resource("/ws").get(ws::connect)),
        )
        .configure(super::web::routes)
        .default_service(web::to(not_found));
}

/// A resource that answers 405 in the contract's shape for methods it lacks.
fn resource(path: &str) -> Resource {
    Resource(web::resource(path).default_service(web::to(method_not_allowed)))
}

struct Resource(actix_web::Resource);

impl Resource {
    fn get<F, Args>(self, h: F) -> Self
    where
        F: actix_web::Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        Resource(self.0.route(web::get().to(h)))
    }
    fn post<F, Args>(self, h: F) -> Self
    where
        F: actix_web::Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        Resource(self.0.route(web::post().to(h)))
    }
    fn put<F, Args>(self, h: F) -> Self
    where
        F: actix_web::Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        Resource(self.0.route(web::put().to(h)))
    }
    fn delete<F, Args>(self, h: F) -> Self
    where
        F: actix_web::Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: actix_web::Responder + 'static,
    {
        Resource(self.0.route(web::delete().to(h)))
    }
}

impl actix_web::dev::HttpServiceFactory for Resource {
    fn register(self, config: &mut actix_web::dev::AppService) {
        self.0.register(config)
    }
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(no_such_endpoint())
}

fn no_such_endpoint() -> ApiError {
    ApiError::new(404, "not_found", "no such endpoint")
}

pub(super) async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        405,
        "method_not_allowed",
        "method not allowed on this endpoint",
    ))
}

async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let registry = state.router.registry();
    if !state.router.serving() {
        let why = state
            .router
            .membership()
            .waiting
            .clone()
            .unwrap_or_else(|| "waiting to learn the cluster's ring".into());
        return HttpResponse::ServiceUnavailable()
            .json(json!({"error": {"code": "starting", "message": why}}));
    }
    match registry.storage_failure() {
        None => HttpResponse::Ok().json(json!({"status": "ok", "node_id": state.router.node_id()})),
        Some(e) => HttpResponse::ServiceUnavailable()
            .json(json!({"error": {"code": "storage_error", "message": e}})),
    }
}

async fn metrics_text() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(metrics().render())
}

/// Admits an operator: `Authorization: Bearer <admin_token>`. Without an admin token in
/// cluster.toml the admin routes do not exist (404).
fn admin(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    let Some(expected) = &state.admin_token else {
        return Err(no_such_endpoint());
    };
    let given = request_token(req).unwrap_or_default();
    // Compared in time independent of where they differ.
    let same = given.len() == expected.len()
        && given
            .bytes()
            .zip(expected.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "unauthorized",
            "admin token missing or wrong",
        ))
    }
}

/// Admits an operator to the chaos calls: they exist only with `[chaos] enabled = true`
/// (and an admin token).
fn chaos_admin(state: &AppState, req: &HttpRequest) -> Result<(), ApiError> {
    if !state.chaos {
        return Err(no_such_endpoint());
    }
    admin(state, req)
}

/// A chaos call's JSON body.
fn chaos_body<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(raw).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KillBody {
    target: String,
}

/// `POST /admin/chaos/kill`: stops an entity actor abruptly, as a panic would (at the
/// entity's home node); `random` picks one of the actors running on this node.
async fn chaos_kill(
    state: web::Data<AppState>,
    req: HttpRequest,
    raw: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // The gate first: without chaos testing these calls do not exist, whatever the body.
    chaos_admin(&state, &req)?;
    let body: KillBody = chaos_body(&raw)?;
    let entity = if body.target == "random" {
        state.router.registry().random_running().ok_or_else(|| {
            ApiError::new(404, "not_found", "no entity actor is running on this node")
        })?
    } else {
        Entity::parse(&body.target).ok_or_else(|| {
            ApiError::bad_request(
                "target must be \"random\", \"user:<id>\", \"conversation:<id>\" or \"group:<id>\"",
            )
        })?
    };
    state.router.kill(entity).await?;
    Ok(HttpResponse::Ok().json(json!({"killed": entity.to_string()})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PartitionBody {
    peer: String,
    for_ms: u64,
}

/// Longest partition or storage fault the chaos calls inject (10 minutes).
const MAX_CHAOS_MS: u64 = 600_000;

/// `POST /admin/chaos/partition`: drops this node's link to `peer`, both ways, for
/// `for_ms`; it heals by itself.
async fn chaos_partition(
    state: web::Data<AppState>,
    req: HttpRequest,
    raw: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // The gate first: without chaos testing these calls do not exist, whatever the body.
    chaos_admin(&state, &req)?;
    let body: PartitionBody = chaos_body(&raw)?;
    if body.for_ms == 0 || body.for_ms > MAX_CHAOS_MS {
        return Err(ApiError::bad_request(format!(
            "for_ms must be 1..={MAX_CHAOS_MS}"
        )));
    }
    let duration = std::time::Duration::from_millis(body.for_ms);
    if !state.router.peers().partition(&body.peer, duration) {
        return Err(ApiError::new(
            404,
            "unknown_node",
            format!("this node has no link to a node {:?}", body.peer),
        ));
    }
    Ok(HttpResponse::Ok().json(json!({"partitioned": body.peer, "for_ms": body.for_ms})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageFaultBody {
    fail_for_ms: u64,
}

/// `POST /admin/chaos/storage` (not in the contract; same conditions as the other chaos
/// calls): every flush of this node's storage fails, as on an I/O error, for
/// `fail_for_ms`.
async fn chaos_storage(
    state: web::Data<AppState>,
    req: HttpRequest,
    raw: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    // The gate first: without chaos testing these calls do not exist, whatever the body.
    chaos_admin(&state, &req)?;
    let body: StorageFaultBody = chaos_body(&raw)?;
    if body.fail_for_ms == 0 || body.fail_for_ms > MAX_CHAOS_MS {
        return Err(ApiError::bad_request(format!(
            "fail_for_ms must be 1..={MAX_CHAOS_MS}"
        )));
    }
    state
        .router
        .registry()
        .store()
        .inject_failures(body.fail_for_ms);
    Ok(HttpResponse::Ok().json(json!({"failing_for_ms": body.fail_for_ms})))
}

/// `GET /admin/cluster`: the ring this node runs and how each node is doing.
async fn admin_cluster(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    admin(&state, &req)?;
    let router = &state.router;
    let (view, pending) = router.cluster_view().await;
    let nodes: Vec<serde_json::Value> = view
        .into_iter()
        .map(|(id, status, owned)| json!({"id": id, "status": status, "owned_entities": owned}))
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "node_id": router.node_id(),
        "ring_version": router.ring_version(),
        "nodes": nodes,
        "handoffs_pending": pending,
    })))
}

/// `POST /admin/reload`: re-reads cluster.toml, as SIGHUP does. 200 with what happens
/// next; 400 `invalid_config` for a file that does not parse, 409 `reload_refused` for
/// one this node cannot move to (it keeps serving its ring).
async fn admin_reload(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    admin(&state, &req)?;
    let config = crate::config::ClusterConfig::load(&state.config_path)
        .map_err(|e| ApiError::new(400, "invalid_config", e.to_string()))?;
    let message = state
        .router
        .reload(&config)
        .map_err(|e| ApiError::new(409, "reload_refused", e))?;
    Ok(HttpResponse::Ok().json(json!({
        "ring_version": state.router.ring_version(),
        "message": message,
    })))
}

/// The authenticated caller: a valid, unrevoked, unexpired token.
pub struct Authed {
    pub user: UserId,
    pub token: TokenHash,
}

/// The token of a request: `Authorization: Bearer` first, else `?token=`.
pub fn request_token(req: &HttpRequest) -> Option<String> {
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The token of a WebSocket upgrade: the header, or `?token=`, which the contract allows
/// here only (browsers cannot set headers on a WebSocket). Everywhere else a token in a
/// URL would end up in access logs and browser history, so it is not read.
pub fn upgrade_token(req: &HttpRequest) -> Option<String> {
    request_token(req).or_else(|| {
        web::Query::<HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("token").cloned())
    })
}

/// Validates a token at its user's home.
pub async fn authenticate(state: &AppState, token: Option<String>) -> Result<Authed, ApiError> {
    let (user, hash) = token
        .as_deref()
        .and_then(auth::parse_token)
        .ok_or_else(ApiError::unauthorized)?;
    match state
        .router
        .user(user, UserRequest::Authenticate { token: hash })
        .await
    {
        Ok(_) => Ok(Authed { user, token: hash }),
        Err(ActorError::UnknownUser) => Err(ApiError::unauthorized()),
        Err(e) => Err(e.into()),
    }
}

impl FromRequest for Authed {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let state = req.app_data::<web::Data<AppState>>().cloned();
        let token = request_token(req);
        Box::pin(async move {
            let state = state.ok_or_else(|| ApiError::new(500, "internal", "no state"))?;
            authenticate(&state, token).await
        })
    }
}

/// A JSON body, read up to the configured limit, whatever its content type.
struct Json<T>(T);

impl<T: DeserializeOwned + 'static> FromRequest for Json<T> {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut Payload) -> Self::Future {
        let limit = req
            .app_data::<web::Data<AppState>>()
            .map_or(1 << 20, |s| s.limits.max_frame_bytes);
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let mut payload = payload.take();
        Box::pin(async move {
            let too_large = || ApiError::new(413, "too_large", format!("body over {limit} bytes"));
            if declared.is_some_and(|n| n > limit) {
                return Err(too_large());
            }
            let mut body = web::BytesMut::new();
            while let Some(chunk) = payload.next().await {
                let chunk =
                    chunk.map_err(|e| ApiError::bad_request(format!("cannot read body: {e}")))?;
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            serde_json::from_slice(&body)
                .map(Json)
                .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
        })
    }
}

/// A path id that must be a UUID.
fn parse_id<T: std::str::FromStr>(raw: &str, what: &str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::invalid_id(what))
}

#[derive(Deserialize)]
struct RegisterBody {
    handle: String,
    password: String,
    #[serde(default)]
    display_name: Option<String>,
}

fn valid_handle(h: &str) -> bool {
    (3..=32).contains(&h.len())
        && h.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b))
}

async fn register(
    state: web::Data<AppState>,
    Json(body): Json<RegisterBody>,
) -> Result<HttpResponse, ApiError> {
    if !valid_handle(&body.handle) {
        return Err(ApiError::new(
            400,
            "invalid_handle",
            "handle must be 3-32 characters of a-z, 0-9, _ . -",
        ));
    }
    if body.password.chars().count() < 8 || body.password.len() > MAX_PASSWORD_BYTES {
        return Err(ApiError::new(
            400,
            "invalid_password",
            "password must be at least 8 characters (and at most 1024 bytes)",
        ));
    }
    let display_name = body.display_name.unwrap_or_else(|| body.handle.clone());
    let n = display_name.chars().count();
    if n == 0 || n > MAX_DISPLAY_NAME_CHARS || display_name.chars().any(char::is_control) {
        return Err(ApiError::new(
            400,
            "invalid_display_name",
            "display_name must be 1-64 characters without control characters",
        ));
    }
    // Hashing is deliberately slow: keep it off the worker and the actors.
    let password_hash = auth::hash_password_bounded(body.password.clone())
        .await
        .map_err(|e| ApiError::new(500, "internal", e))?;
    let user_id = UserId::random();
    let router = &state.router;
    if router
        .claim_handle(body.handle.clone(), user_id)
        .await?
        .is_some()
    {
        // Taken, whoever took it, as the contract says. (A client whose first attempt
        // got an error may have registered after all: logging in tells it.)
        return Err(ActorError::HandleTaken.into());
    }
    let created = router
        .user(
            user_id,
            UserRequest::Create {
                handle: body.handle.clone(),
                display_name,
                password_hash,
            },
        )
        .await;
    match created {
        Ok(UserReply::Profile(p)) => Ok(registered(&p)),
        // No answer in time from a reachable home: the user may exist. Keep the
        // handle, so logging in finds it. (Unreachable: the call never left, and the
        // handle is released below.)
        Err(ActorError::Unavailable) if router.reachable(user_id) => {
            Err(ActorError::Unavailable.into())
        }
        other => {
            let _ = router.release_handle(body.handle, user_id).await;
            Err(unexpected(other.map(|_| ())).into())
        }
    }
}

/// The answer to a registration.
fn registered(p: &UserProfile) -> HttpResponse {
    HttpResponse::Created().json(json!({
        "user_id": p.user_id,
        "handle": p.handle,
        "display_name": p.display_name,
    }))
}

#[derive(Deserialize)]
struct LoginBody {
    handle: String,
    password: String,
}

async fn login(
    state: web::Data<AppState>,
    Json(body): Json<LoginBody>,
) -> Result<HttpResponse, ApiError> {
    if !valid_handle(&body.handle) || body.password.len() > MAX_PASSWORD_BYTES {
        return Err(ActorError::InvalidCredentials.into());
    }
    let user_id = state
        .router
        .resolve_handle(body.handle)
        .await?
        .ok_or(ActorError::InvalidCredentials)?;
    match state
        .router
        .user(
            user_id,
            UserRequest::Login {
                password: body.password,
            },
        )
        .await?
    {
        UserReply::Token { token, expires_at } => Ok(HttpResponse::Ok().json(json!({
            "token": token,
            "user_id": user_id,
            "expires_at": expires_at,
        }))),
        _ => Err(unexpected(Ok(())).into()),
    }
}

async fn logout(state: web::Data<AppState>, me: Authed) -> Result<HttpResponse, ApiError> {
    state
        .router
        .user(me.user, UserRequest::Logout { token: me.token })
        .await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn profile(state: &AppState, id: UserId) -> Result<HttpResponse, ApiError> {
    match state.router.user(id, UserRequest::Profile).await? {
        UserReply::Profile(p) => Ok(HttpResponse::Ok().json(UserJson::from(&p))),
        _ => Err(unexpected(Ok(())).into()),
    }
}

async fn me(state: web::Data<AppState>, me: Authed) -> Result<HttpResponse, ApiError> {
    profile(&state, me.user).await
}

async fn user(
    state: web::Data<AppState>,
    _me: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    profile(&state, parse_id(&path, "user_id")?).await
}

async fn find_user(
    state: web::Data<AppState>,
    _me: Authed,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query = query_map(&req)?;
    let handle = query
        .get("handle")
        .ok_or_else(|| ApiError::bad_request("missing query parameter `handle`"))?;
    let unknown = || {
        ApiError::new(
            404,
            "unknown_user",
            format!("no user has the handle {handle:?}"),
        )
    };
    if !valid_handle(handle) {
        return Err(unknown());
    }
    let id = state
        .router
        .resolve_handle(handle.clone())
        .await?
        .ok_or_else(unknown)?;
    profile(&state, id).await
}

/// `POST /media`: streams the body into the media store (never whole in memory),
/// refusing it past `max_media_bytes` without keeping any of it.
async fn upload_media(
    state: web::Data<AppState>,
    me: Authed,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let max = state.limits.max_media_bytes;
    let too_large = || ApiError::new(413, "too_large", format!("upload over {max} bytes"));
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large());
    }
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 255)
        .unwrap_or("application/octet-stream")
        .to_string();
    let registry = state.router.registry();
    // Dropping the writer (on any early return) deletes the partial file.
    let mut writer = registry.media_writer().await?;
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("upload cut off: {e}")))?;
        if writer.size() + chunk.len() as u64 > max {
            return Err(too_large());
        }
        writer
            .write(&chunk)
            .await
            .map_err(|e| ApiError::from(ActorError::from(e)))?;
    }
    if declared.is_some_and(|n| n != writer.size()) {
        return Err(ApiError::bad_request(
            "upload shorter than its Content-Length",
        ));
    }
    // The guard counts the upload as in flight until its record is stored.
    let (id, _in_flight) = state.router.new_media_id().ok_or_else(|| {
        ApiError::new(
            503,
            "owner_unavailable",
            "this node is joining or leaving the cluster and stores no uploads until that is done: try again shortly or upload through another node",
        )
    })?;
    let rec = registry
        .save_media(writer, id, content_type, me.user)
        .await?;
    Ok(HttpResponse::Created().json(json!({
        "media_id": rec.media_id,
        "size": rec.size,
        "sha256": rec.sha256,
        "content_type": rec.content_type,
    })))
}

/// `GET /media/{id}`: the bytes, with `Range` support (206, 416) from actix-files.
async fn download_media(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let id: uuid::Uuid = parse_id(&path, "media_id")?;
    if let Some(home) = state.router.media_elsewhere(&id) {
        // Proxied once at most: two nodes whose rings disagree must not bounce it.
        if req.headers().contains_key(PROXIED) {
            return Err(ActorError::Unavailable.into());
        }
        return proxy_media(&state, home, id, &req).await;
    }
    let (rec, file) = state.router.registry().readable_media(me.user, id).await?;
    let mime: actix_web::mime::Mime = rec
        .content_type
        .parse()
        .unwrap_or(actix_web::mime::APPLICATION_OCTET_STREAM);
    let media_file =
        |e: std::io::Error| ApiError::new(500, "storage_error", format!("media file: {e}"));
    let range = req
        .headers()
        .get(header::RANGE)
        .map(|v| v.to_str().unwrap_or_default());
    match range {
        // A malformed Range is ignored (RFC 9110 14.2): the whole object. (Parsed
        // against an unbounded size, only a syntax error can fail.)
        Some(r) if actix_files::HttpRange::parse(r, u64::MAX).is_err() => {
            let bytes = tokio::fs::File::open(&file).await.map_err(media_file)?;
            return Ok(HttpResponse::Ok()
                .content_type(mime)
                .insert_header((header::ACCEPT_RANGES, "bytes"))
                .body(actix_web::body::SizedStream::new(
                    rec.size,
                    tokio_util::io::ReaderStream::new(bytes),
                )));
        }
        // Well-formed but past the end: 416, with the contract's error body.
        Some(r) if actix_files::HttpRange::parse(r, rec.size).is_err() => {
            let msg = format!("the range starts past the end ({} bytes)", rec.size);
            let mut refused = ApiError::new(416, "range_not_satisfiable", msg).error_response();
            if let Ok(v) = format!("bytes */{}", rec.size).parse() {
                refused.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(refused);
        }
        _ => {}
    }
    let named = actix_files::NamedFile::open_async(&file)
        .await
        .map_err(media_file)?;
    Ok(named
        .set_content_type(mime)
        .disable_content_disposition()
        .into_response(&req))
}

/// Marks a media read one node makes of another on a client's behalf.
const PROXIED: &str = "x-switchboard-proxied";

/// Reads a media object from its home node for the client, streaming the answer
/// through: the home checks the client's token and access itself, and handles `Range`.
async fn proxy_media(
    state: &AppState,
    home: std::net::SocketAddr,
    id: uuid::Uuid,
    req: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let mut ask = state
        .http
        .get(format!("http://{home}/api/v1/media/{id}"))
        .header(PROXIED, "1");
    if let Some(token) = request_token(req) {
        ask = ask.bearer_auth(token);
    }
    if let Some(range) = req.headers().get(header::RANGE) {
        ask = ask.header(header::RANGE.as_str(), range.as_bytes());
    }
    let answer = ask
        .send()
        .await
        .map_err(|_| ApiError::from(ActorError::Unavailable))?;
    let status = actix_web::http::StatusCode::from_u16(answer.status().as_u16())
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let mut out = HttpResponse::build(status);
    for name in [
        "content-type",
        "content-range",
        "accept-ranges",
        "content-length",
    ] {
        if let Some(v) = answer.headers().get(name) {
            out.insert_header((name, v.as_bytes()));
        }
    }
    let length = answer.content_length();
    let body = answer.bytes_stream().map(|chunk| {
        chunk.map_err(|e| actix_web::error::ErrorBadGateway(format!("media home: {e}")))
    });
    Ok(match length {
        Some(n) => out.body(actix_web::body::SizedStream::new(n, body)),
        None => out.streaming(body),
    })
}

/// Longest opaque key string accepted (identity key, signed prekey, one prekey).
const MAX_KEY_BYTES: usize = 8192;
/// Most one-time prekeys in one upload.
const MAX_PREKEYS_PER_PUT: usize = 1000;

#[derive(Deserialize)]
struct KeysBody {
    identity_key: String,
    signed_prekey: String,
    /// Absent or `null`: no new prekeys.
    #[serde(default)]
    prekeys: Option<Vec<String>>,
}

async fn put_keys(
    state: web::Data<AppState>,
    me: Authed,
    Json(body): Json<KeysBody>,
) -> Result<HttpResponse, ApiError> {
    // The keys are opaque (clients may send ciphertext): only their sizes are checked.
    let prekeys = body.prekeys.unwrap_or_default();
    let sized = |k: &str| !k.is_empty() && k.len() <= MAX_KEY_BYTES;
    if !sized(&body.identity_key)
        || !sized(&body.signed_prekey)
        || !prekeys.iter().all(|k| sized(k))
    {
        return Err(ApiError::bad_request(format!(
            "every key must be a non-empty string of at most {MAX_KEY_BYTES} bytes"
        )));
    }
    if prekeys.len() > MAX_PREKEYS_PER_PUT {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_PREKEYS_PER_PUT} prekeys per upload"
        )));
    }
    let req = UserRequest::PutKeys {
        bundle: KeyBundle {
            identity_key: body.identity_key,
            signed_prekey: body.signed_prekey,
        },
        prekeys,
    };
    state.router.user(me.user, req).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn claim_keys(
    state: web::Data<AppState>,
    _me: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user: UserId = parse_id(&path, "user_id")?;
    match state.router.user(user, UserRequest::ClaimKeys).await? {
        UserReply::Keys { bundle, prekey } => {
            let mut body = json!({
                "identity_key": bundle.identity_key,
                "signed_prekey": bundle.signed_prekey,
            });
            if let Some(p) = prekey {
                body["prekey"] = json!(p);
            }
            Ok(HttpResponse::Ok().json(body))
        }
        _ => Err(unexpected(Ok(())).into()),
    }
}

/// The contact list as user objects (contacts that cannot answer right now are left
/// out rather than failing the whole list).
async fn contact_list(state: &AppState, reply: UserReply) -> Result<HttpResponse, ApiError> {
    let UserReply::Users(ids) = reply else {
        return Err(unexpected(Ok(())).into());
    };
    let profiles = join_all(
        ids.iter()
            .map(|id| state.router.user(*id, UserRequest::Profile)),
    )
    .await;
    let list: Vec<UserProfile> = profiles
        .into_iter()
        .filter_map(|p| match p {
            Ok(UserReply::Profile(p)) => Some(p),
            _ => None,
        })
        .collect();
    Ok(HttpResponse::Ok().json(list.iter().map(UserJson::from).collect::<Vec<_>>()))
}

async fn contacts(state: web::Data<AppState>, me: Authed) -> Result<HttpResponse, ApiError> {
    let reply = state.router.user(me.user, UserRequest::Contacts).await?;
    contact_list(&state, reply).await
}

async fn add_contact(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    change_contacts(&state, me, &path, |contact| UserRequest::AddContact {
        contact,
    })
    .await
}

async fn remove_contact(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    change_contacts(&state, me, &path, |contact| UserRequest::RemoveContact {
        contact,
    })
    .await
}

/// Applies a contact change for the caller and answers with the resulting list.
async fn change_contacts(
    state: &AppState,
    me: Authed,
    raw_id: &str,
    change: fn(UserId) -> UserRequest,
) -> Result<HttpResponse, ApiError> {
    let contact: UserId = parse_id(raw_id, "user_id")?;
    let reply = state.router.user(me.user, change(contact)).await?;
    contact_list(state, reply).await
}

async fn conversations(state: web::Data<AppState>, me: Authed) -> Result<HttpResponse, ApiError> {
    let UserReply::Conversations(list) = state
        .router
        .user(me.user, UserRequest::Conversations)
        .await?
    else {
        return Err(unexpected(Ok(())).into());
    };
    let views = join_all(list.iter().map(|c| {
        state.router.conversation(
            c.conversation_id,
            ConversationRequest::View { user: me.user },
        )
    }))
    .await;
    let mut out = Vec::with_capacity(list.len());
    for (c, view) in list.iter().zip(views) {
        let (last_seq, wm) = match view {
            Ok(ConversationReply::View {
                last_seq,
                watermarks,
            }) => (last_seq.max(c.head), watermarks),
            // A conversation that cannot answer right now still appears, with what the
            // inbox knows.
            _ => (c.head, Default::default()),
        };
        let mut item = json!({
            "conversation_id": c.conversation_id,
            "kind": match c.kind { ConversationKind::Direct => "direct", _ => "group" },
            "last_seq": last_seq,
            "delivered_seq": wm.delivered,
            "read_seq": wm.read,
        });
        match &c.kind {
            ConversationKind::Direct => item["peer_id"] = json!(c.peer_id),
            ConversationKind::Group { group_id } => item["group_id"] = json!(group_id),
        }
        out.push(item);
    }
    Ok(HttpResponse::Ok().json(out))
}

#[derive(Deserialize)]
struct CreateGroupBody {
    name: String,
    #[serde(default)]
    members: Vec<String>,
}

#[derive(Deserialize)]
struct AddMemberBody {
    user_id: String,
}

/// The contract's group object.
fn group_json(g: &GroupRecord) -> serde_json::Value {
    json!({
        "group_id": g.group_id,
        "conversation_id": g.conversation_id,
        "name": g.name,
        "members": g.members.iter().map(|m| json!({
            "user_id": m.user_id,
            "role": match m.role { GroupRole::Admin => "admin", GroupRole::Member => "member" },
        })).collect::<Vec<_>>(),
    })
}

async fn group_call(
    state: &AppState,
    id: GroupId,
    req: GroupRequest,
) -> Result<serde_json::Value, ApiError> {
    match state.router.group(id, req).await? {
        GroupReply::Group(g) => Ok(group_json(&g)),
        GroupReply::Done => Err(unexpected(Ok(())).into()),
    }
}

async fn create_group(
    state: web::Data<AppState>,
    me: Authed,
    Json(body): Json<CreateGroupBody>,
) -> Result<HttpResponse, ApiError> {
    // Refused before any id is parsed or looked up: a list this long cannot fit.
    let max = state.limits.max_group_members;
    if body.members.len() > max {
        return Err(ActorError::GroupFull(max).into());
    }
    let members = body
        .members
        .iter()
        .map(|m| parse_id::<UserId>(m, "a member id"))
        .collect::<Result<Vec<_>, _>>()?;
    let req = GroupRequest::Create {
        creator: me.user,
        name: body.name,
        members,
    };
    let group = group_call(&state, GroupId::random(), req).await?;
    Ok(HttpResponse::Created().json(group))
}

async fn group(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let gid: GroupId = parse_id(&path, "group id")?;
    let group = group_call(&state, gid, GroupRequest::View { user: me.user }).await?;
    Ok(HttpResponse::Ok().json(group))
}

async fn add_member(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<String>,
    Json(body): Json<AddMemberBody>,
) -> Result<HttpResponse, ApiError> {
    let gid: GroupId = parse_id(&path, "group id")?;
    let user: UserId = parse_id(&body.user_id, "user_id")?;
    let req = GroupRequest::AddMember { by: me.user, user };
    Ok(HttpResponse::Ok().json(group_call(&state, gid, req).await?))
}

async fn remove_member(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (gid, user) = path.into_inner();
    let gid: GroupId = parse_id(&gid, "group id")?;
    let user: UserId = parse_id(&user, "user_id")?;
    let req = GroupRequest::RemoveMember { by: me.user, user };
    Ok(HttpResponse::Ok().json(group_call(&state, gid, req).await?))
}

fn query_map(req: &HttpRequest) -> Result<HashMap<String, String>, ApiError> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(|q| q.into_inner())
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))
}

fn query_u64(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    q.get(name)
        .map(|v| {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("`{name}` must be a non-negative integer"))
            })
        })
        .transpose()
}

async fn history(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<String>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let cid: ConversationId = parse_id(&path, "conversation id")?;
    let q = query_map(&req)?;
    let limit = match query_u64(&q, "limit")? {
        None => DEFAULT_PAGE,
        Some(n) if (1..=MAX_PAGE as u64).contains(&n) => n as usize,
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "`limit` must be 1..={MAX_PAGE}"
            )))
        }
    };
    let req = ConversationRequest::History {
        user: me.user,
        after: query_u64(&q, "after_seq")?,
        before: query_u64(&q, "before_seq")?,
        limit,
    };
    match state.router.conversation(cid, req).await? {
        ConversationReply::Messages(messages) => {
            let messages: Vec<MessageJson> = messages.iter().map(MessageJson::from).collect();
            Ok(HttpResponse::Ok().json(json!({ "messages": messages })))
        }
        _ => Err(unexpected(Ok(())).into()),
    }
}

async fn receipts(
    state: web::Data<AppState>,
    me: Authed,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let cid: ConversationId = parse_id(&path, "conversation id")?;
    match state
        .router
        .conversation(cid, ConversationRequest::Receipts { user: me.user })
        .await?
    {
        ConversationReply::Receipts(list) => Ok(HttpResponse::Ok().json(
            list.iter()
                .map(|(u, wm)| json!({"user_id": u, "delivered_seq": wm.delivered, "read_seq": wm.read}))
                .collect::<Vec<_>>(),
        )),
        _ => Err(unexpected(Ok(())).into()),
    }
}

/// A reply of the wrong variant is a bug; an error passes through.
fn unexpected(r: Result<(), ActorError>) -> ActorError {
    match r {
        Err(e) => e,
        Ok(()) => ActorError::Internal("unexpected reply".into()),
    }
}
