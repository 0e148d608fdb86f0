//! A request's path -> what kind of call it is, how it is routed, and a bounded metrics label.
//!
//! Classification is a match on the path: no allocation, no lookups.

/// How a call is routed (see DESIGN.md's routing table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `Control/Solve`: keyed by its Ref and the sessions it names; placed when new.
    Solve,
    /// `Control/Session`: held until a Solve names its uuid, then that Solve's backend.
    Session,
    /// `Control/Status`: the Ref's backend, waiting briefly for its Solve.
    Status,
    /// `LLBBridge/*`: the backend of the `buildkit-controlapi-buildid` header's build.
    Bridge,
    /// `ListenBuildHistory`: the Ref's backend, or every backend merged.
    ListenHistory,
    /// `UpdateBuildHistory`: the Ref's backend, or every backend.
    UpdateHistory,
    /// `DiskUsage` (unary): every backend, answers merged.
    FanOutUnary,
    /// `Prune` (server stream): every backend, streams merged.
    FanOutStream,
    /// `ListWorkers`, `Info`: any ready backend, this connection's first.
    AnyReady,
    /// Content, TraceService, reflection, anything unknown: this connection's backend.
    Sticky,
    /// `grpc.health.v1.Health/*`: answered by the router itself.
    Health,
}

impl Route {
    /// Whether the call is part of one build (keyed by a build ref or session).
    pub fn belongs_to_build(self) -> bool {
        matches!(
            self,
            Route::Solve
                | Route::Session
                | Route::Status
                | Route::Bridge
                | Route::ListenHistory
                | Route::UpdateHistory
        )
    }
}

/// A classified call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    pub route: Route,
    /// Metrics label: the method name for known methods, "other" for the rest (bounded cardinality).
    pub method: &'static str,
}

const CONTROL: &str = "/moby.buildkit.v1.Control/";
const BRIDGE: &str = "/moby.buildkit.v1.frontend.LLBBridge/";
const HEALTH: &str = "/grpc.health.v1.Health/";

/// Classifies a request by its `:path`.
pub fn classify(path: &str) -> Call {
    if let Some(method) = path.strip_prefix(CONTROL) {
        let (route, label) = match method {
            "Solve" => (Route::Solve, "Control/Solve"),
            "Session" => (Route::Session, "Control/Session"),
            "Status" => (Route::Status, "Control/Status"),
            "ListenBuildHistory" => (Route::ListenHistory, "Control/ListenBuildHistory"),
            "UpdateBuildHistory" => (Route::UpdateHistory, "Control/UpdateBuildHistory"),
            "DiskUsage" => (Route::FanOutUnary, "Control/DiskUsage"),
            "Prune" => (Route::FanOutStream, "Control/Prune"),
            "ListWorkers" => (Route::AnyReady, "Control/ListWorkers"),
            "Info" => (Route::AnyReady, "Control/Info"),
            _ => (Route::Sticky, "other"),
        };
        return Call {
            route,
            method: label,
        };
    }
    if let Some(method) = path.strip_prefix(BRIDGE) {
        return Call {
            route: Route::Bridge,
            method: bridge_label(method),
        };
    }
    if let Some(method) = path.strip_prefix(HEALTH) {
        let label = match method {
            "Check" => "Health/Check",
            "Watch" => "Health/Watch",
            "List" => "Health/List",
            _ => "other",
        };
        return Call {
            route: Route::Health,
            method: label,
        };
    }
    let label = if path.starts_with("/containerd.services.content.v1.Content/") {
        "Content"
    } else if path == "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
        "TraceService/Export"
    } else if path.starts_with("/grpc.reflection.") {
        "ServerReflection"
    } else {
        "other"
    };
    Call {
        route: Route::Sticky,
        method: label,
    }
}

fn bridge_label(method: &str) -> &'static str {
    match method {
        "Ping" => "LLBBridge/Ping",
        "Solve" => "LLBBridge/Solve",
        "Return" => "LLBBridge/Return",
        "ReadFile" => "LLBBridge/ReadFile",
        "ReadDir" => "LLBBridge/ReadDir",
        "StatFile" => "LLBBridge/StatFile",
        "Evaluate" => "LLBBridge/Evaluate",
        "ResolveImageConfig" => "LLBBridge/ResolveImageConfig",
        "ResolveSourceMeta" => "LLBBridge/ResolveSourceMeta",
        "Inputs" => "LLBBridge/Inputs",
        "Warn" => "LLBBridge/Warn",
        "NewContainer" => "LLBBridge/NewContainer",
        "ReleaseContainer" => "LLBBridge/ReleaseContainer",
        "ExecProcess" => "LLBBridge/ExecProcess",
        "ReadFileContainer" => "LLBBridge/ReadFileContainer",
        "ReadDirContainer" => "LLBBridge/ReadDirContainer",
        "StatFileContainer" => "LLBBridge/StatFileContainer",
        _ => "LLBBridge/other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_routing_table_row_classifies() {
        let cases = [
            ("/moby.buildkit.v1.Control/Solve", Route::Solve),
            ("/moby.buildkit.v1.Control/Session", Route::Session),
            ("/moby.buildkit.v1.Control/Status", Route::Status),
            ("/moby.buildkit.v1.frontend.LLBBridge/Ping", Route::Bridge),
            (
                "/moby.buildkit.v1.frontend.LLBBridge/ExecProcess",
                Route::Bridge,
            ),
            (
                "/moby.buildkit.v1.Control/ListenBuildHistory",
                Route::ListenHistory,
            ),
            (
                "/moby.buildkit.v1.Control/UpdateBuildHistory",
                Route::UpdateHistory,
            ),
            ("/moby.buildkit.v1.Control/DiskUsage", Route::FanOutUnary),
            ("/moby.buildkit.v1.Control/Prune", Route::FanOutStream),
            ("/moby.buildkit.v1.Control/ListWorkers", Route::AnyReady),
            ("/moby.buildkit.v1.Control/Info", Route::AnyReady),
            (
                "/containerd.services.content.v1.Content/Read",
                Route::Sticky,
            ),
            (
                "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                Route::Sticky,
            ),
            (
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                Route::Sticky,
            ),
            ("/grpc.health.v1.Health/Check", Route::Health),
            ("/some.unknown.Service/Method", Route::Sticky),
            ("/moby.buildkit.v1.Control/NewFancyCall", Route::Sticky),
        ];
        for (path, route) in cases {
            assert_eq!(classify(path).route, route, "{path}");
        }
    }

    #[test]
    fn unknown_methods_share_one_metrics_label() {
        assert_eq!(classify("/a.B/C").method, "other");
        assert_eq!(classify("/moby.buildkit.v1.Control/Nope").method, "other");
        assert_eq!(
            classify("/moby.buildkit.v1.Control/Solve").method,
            "Control/Solve"
        );
    }
}
