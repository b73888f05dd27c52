//! The web client: the chat app in `web/`, served at `/` by every node.
//!
//! The files are embedded in the binary at build time (`include_bytes!`), so a node
//! needs no web server and no build step beside it. The app is a client of the contract
//! only (`/api/v1` over HTTP and the WebSocket), like any third-party client: this module
//! owns nothing but the bytes and their headers, and touches no actor.
//!
//! Invariants: only the exact paths of [`ASSETS`] are served here (anything else falls
//! through to the API's 404 in the contract's error shape); every answer carries a
//! strong `ETag` and `Cache-Control: no-cache`, so a browser revalidates with a cheap
//! `304` and never runs a stale app after a node is upgraded; the page is locked down by
//! a small Content-Security-Policy (its own scripts and styles only, connections to its
//! own origin only, images from itself or from `blob:` URLs the app makes from media it
//! fetched with its token).

use std::sync::OnceLock;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

/// One embedded file and the path it is served at.
pub struct Asset {
    pub path: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

/// Every file of the app. `index.html` refers to the others by these paths.
pub const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../web/index.html"),
    },
    Asset {
        path: "/web/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/app.js"),
    },
    Asset {
        path: "/web/client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../web/client.js"),
    },
    Asset {
        path: "/web/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../web/style.css"),
    },
    Asset {
        path: "/web/icon.svg",
        content_type: "image/svg+xml",
        body: include_bytes!("../../web/icon.svg"),
    },
];

/// The page's policy: nothing from elsewhere, no inline script or style, no plugins, no
/// framing, and no form may submit anywhere (the app handles its forms in script, so a
/// page whose script failed cannot send a password in a URL).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
    style-src 'self'; img-src 'self' blob:; connect-src 'self'; base-uri 'none'; \
    form-action 'none'; frame-ancestors 'none'";

/// Mounts every asset at its path (GET and HEAD; other methods get the contract's 405).
pub fn routes(cfg: &mut web::ServiceConfig) {
    for (index, asset) in ASSETS.iter().enumerate() {
        cfg.service(
            web::resource(asset.path)
                .route(web::get().to(move |req: HttpRequest| serve(index, req)))
                .route(web::head().to(move |req: HttpRequest| serve(index, req)))
                .default_service(web::to(super::http::method_not_allowed)),
        );
    }
}

/// Strong validators, one per asset, computed once from the embedded bytes.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| format!("\"{:016x}\"", xxhash_rust::xxh3::xxh3_64(a.body)))
            .collect()
    })
}

/// Whether `If-None-Match` names `etag` (or is `*`).
fn still_fresh(req: &HttpRequest, etag: &str) -> bool {
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t == etag || t == "*")
}

async fn serve(index: usize, req: HttpRequest) -> HttpResponse {
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    let fresh = still_fresh(&req, etag);
    let mut answer = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    answer
        .insert_header((header::ETAG, etag.as_str()))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"));
    if asset.content_type.starts_with("text/html") {
        answer
            .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
            .insert_header((header::X_FRAME_OPTIONS, "DENY"));
    }
    if fresh {
        return answer.finish();
    }
    answer.content_type(asset.content_type).body(asset.body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::to_bytes;
    use actix_web::http::StatusCode;
    use actix_web::test as http_test;
    use actix_web::App;

    async fn app() -> impl actix_web::dev::Service<
        actix_http::Request,
        Response = actix_web::dev::ServiceResponse,
        Error = actix_web::Error,
    > {
        http_test::init_service(
            // The node's real routing (API, web files, the 404 default), so what
            // falls through here is what a client would get.
            App::new().configure(super::super::http::routes),
        )
        .await
    }

    #[actix_web::test]
    async fn serves_every_asset_with_its_type_and_validator() {
        let app = app().await;
        for (asset, etag) in ASSETS.iter().zip(etags()) {
            let res = http_test::call_service(
                &app,
                http_test::TestRequest::get().uri(asset.path).to_request(),
            )
            .await;
            assert_eq!(res.status(), StatusCode::OK, "{}", asset.path);
            let h = res.headers();
            assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), asset.content_type);
            assert_eq!(h.get(header::ETAG).unwrap(), etag.as_str());
            assert_eq!(h.get(header::CACHE_CONTROL).unwrap(), "no-cache");
            assert_eq!(h.get(header::X_CONTENT_TYPE_OPTIONS).unwrap(), "nosniff");
            let body = to_bytes(res.into_body()).await.unwrap();
            assert_eq!(&body[..], asset.body, "{}", asset.path);
        }
    }

    #[actix_web::test]
    async fn the_page_carries_its_policy() {
        let app = app().await;
        let res =
            http_test::call_service(&app, http_test::TestRequest::get().uri("/").to_request())
                .await;
        let csp = res.headers().get(header::CONTENT_SECURITY_POLICY).unwrap();
        assert_eq!(csp, CONTENT_SECURITY_POLICY);
        assert!(CONTENT_SECURITY_POLICY.contains("script-src 'self';"));
        assert!(!CONTENT_SECURITY_POLICY.contains("unsafe"));
    }

    #[actix_web::test]
    async fn a_known_etag_is_answered_304_without_a_body() {
        let app = app().await;
        let etag = etags()[1].clone();
        let req = http_test::TestRequest::get()
            .uri(ASSETS[1].path)
            .insert_header((header::IF_NONE_MATCH, format!("\"other\", {etag}")))
            .to_request();
        let res = http_test::call_service(&app, req).await;
        assert_eq!(res.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(res.headers().get(header::ETAG).unwrap(), etag.as_str());
        assert!(to_bytes(res.into_body()).await.unwrap().is_empty());
        let req = http_test::TestRequest::get()
            .uri(ASSETS[1].path)
            .insert_header((header::IF_NONE_MATCH, "\"stale\""))
            .to_request();
        assert_eq!(
            http_test::call_service(&app, req).await.status(),
            StatusCode::OK
        );
    }

    #[actix_web::test]
    async fn other_methods_and_paths_get_the_contracts_errors() {
        let app = app().await;
        let res =
            http_test::call_service(&app, http_test::TestRequest::post().uri("/").to_request())
                .await;
        assert_eq!(res.status(), StatusCode::METHOD_NOT_ALLOWED);
        let body: serde_json::Value = http_test::read_body_json(res).await;
        assert_eq!(body["error"]["code"], "method_not_allowed");
        for path in ["/web/", "/web/nope.js", "/index.html", "/web/app.js/x"] {
            let res =
                http_test::call_service(&app, http_test::TestRequest::get().uri(path).to_request())
                    .await;
            assert_eq!(res.status(), StatusCode::NOT_FOUND, "{path}");
            let body: serde_json::Value = http_test::read_body_json(res).await;
            assert_eq!(body["error"]["code"], "not_found", "{path}");
        }
    }

    /// Every `/web/...` path the page and its modules name is one this module serves, and
    /// no asset shadows the API or the root calls.
    #[test]
    fn the_app_refers_only_to_served_paths() {
        let served: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        let mut named = 0;
        for asset in ASSETS {
            let text = std::str::from_utf8(asset.body).expect("assets are UTF-8");
            for (i, _) in text.match_indices("/web/") {
                let rest = &text[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "/._-".contains(c)))
                    .unwrap_or(rest.len());
                let path = &rest[..end];
                assert!(served.contains(&path), "{} names {path}", asset.path);
                named += 1;
            }
            for (i, _) in text.match_indices("from \"./") {
                let rest = &text[i + "from \"./".len()..];
                let name = &rest[..rest.find('"').unwrap_or(0)];
                let path = format!("/web/{name}");
                assert!(
                    served.contains(&path.as_str()),
                    "{} imports {path}",
                    asset.path
                );
                named += 1;
            }
            for api in ["/api/", "/healthz", "/metrics", "/admin"] {
                assert!(!asset.path.starts_with(api), "{} shadows {api}", asset.path);
            }
        }
        // index.html names the script, the style sheet and the icon; app.js imports client.js.
        assert!(named >= 4, "only {named} references found");
    }
}
