//! Control/ListenBuildHistory and UpdateBuildHistory: to the daemon that holds the ref, else
//! every daemon.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;

use super::base::{error_response_invalid, ConnState, Router};
use crate::body::{RequestBody, ResponseBody};
use crate::forward::Head;
use crate::registry::KeyKind;
use crate::wire;

/// The ref of buildx's history API probe (buildkit-protocol.md, "What one build looks like").
pub(super) const BUILDX_HISTORY_PROBE: &str = "buildx-test-history-api-feature";

impl Router {
    pub(super) async fn history(
        self: &Arc<Self>,
        conn: &Arc<ConnState>,
        request: Request<Incoming>,
        listen: bool,
    ) -> Response<ResponseBody> {
        let what = if listen {
            "Control/ListenBuildHistory"
        } else {
            "Control/UpdateBuildHistory"
        };
        let (parts, body, peeked) = match self.peek(request).await {
            Ok(peeked) => peeked,
            Err(answer) => return answer,
        };
        let build_ref = if listen {
            wire::decode_history_request(peeked.message()).map(|h| h.build_ref)
        } else {
            wire::decode_update_history_ref(peeked.message())
        };
        let build_ref = match build_ref {
            Ok(r) => r.to_owned(),
            Err(error) => return error_response_invalid(what, &error),
        };
        if !build_ref.is_empty() {
            tracing::Span::current().record("build_ref", &*build_ref);
            // Known to this router, else found in a daemon's history (the Content reads that
            // follow on this connection then go there too); else every backend is asked.
            let backend = match self.registry.lookup(KeyKind::Ref, &build_ref) {
                Some(backend) => Some(backend),
                // buildx's feature probe names a ref no daemon holds: skip the search.
                None if build_ref == BUILDX_HISTORY_PROBE => None,
                None => self.locate_ref(&build_ref).await,
            };
            if let Some(backend) = backend {
                return self
                    .forward_to(
                        conn,
                        &backend,
                        Some(&build_ref),
                        parts,
                        RequestBody::prefixed(peeked.buffered, body).holding(peeked.share),
                    )
                    .await;
            }
        }
        // History is per daemon: ask them all.
        let head = Head::from_parts(&parts);
        if listen {
            self.merge_streams(head, peeked.buffered)
        } else {
            self.first_ok(
                &head,
                peeked.buffered,
                (!build_ref.is_empty()).then_some(build_ref.as_str()),
            )
            .await
        }
    }
}
