//! Which Tailscale failures pass on their own and which wait for someone to change something.

use super::authkey::AuthKeyError;
use super::localapi::LocalApiError;
use crate::mesh::MeshError;

impl From<LocalApiError> for MeshError {
    fn from(error: LocalApiError) -> Self {
        let text = error.to_string();
        if text.contains("config file is locked") {
            // Overriding the operator's file would be wrong, and retrying cannot help.
            return MeshError::needs_operator(format!(
                "tailscaled runs with --config, which locks its settings; clawnode will not fight the config file: set hostname, tags and services there, or run tailscaled without --config ({text})"
            ));
        }
        match error {
            // A daemon restarting, busy, or without a netmap yet.
            LocalApiError::Unreachable { .. }
            | LocalApiError::Timeout { .. }
            | LocalApiError::NoNetmap { .. }
            | LocalApiError::RateLimited { .. }
            | LocalApiError::EtagMismatch { .. }
            | LocalApiError::Decode { .. } => MeshError::transient(text),
            // Permissions and a daemon without the endpoint stay as they are until changed.
            LocalApiError::Forbidden { .. } | LocalApiError::NotFound { .. } => {
                MeshError::needs_operator(text)
            }
            // A 4xx refuses what clawnode asked for, and the same request is refused again.
            LocalApiError::Status { status, .. } if (400..500).contains(&status) => {
                MeshError::needs_operator(text)
            }
            LocalApiError::Status { .. } => MeshError::transient(text),
        }
    }
}

impl From<AuthKeyError> for MeshError {
    fn from(error: AuthKeyError) -> Self {
        let text = error.to_string();
        match error {
            // The config or the secret it points at is wrong or missing.
            AuthKeyError::Config(_) | AuthKeyError::Read { .. } => MeshError::needs_operator(text),
            // Credentials the control plane rejects stay rejected; 408 and 429 pass.
            AuthKeyError::Exchange {
                status: Some(status),
                ..
            } if (400..500).contains(&status) && status != 408 && status != 429 => {
                MeshError::needs_operator(text)
            }
            AuthKeyError::Exchange { .. } => MeshError::transient(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Retry;

    fn status(status: u16, message: &str) -> LocalApiError {
        LocalApiError::Status {
            call: "POST /localapi/v0/start".into(),
            status,
            message: message.into(),
        }
    }

    #[test]
    fn a_config_file_locked_tailscaled_needs_the_operator_and_says_why() {
        let error = MeshError::from(status(
            500,
            "can't reconfigure tailscaled when using a config file; config file is locked",
        ));
        assert_eq!(error.retry(), Retry::NeedsOperator);
        assert!(error.message().contains("tailscaled runs with --config"));
        assert!(error.message().contains("will not fight the config file"));
        assert!(error.message().contains("config file is locked"));
    }

    #[test]
    fn an_unreachable_or_slow_or_failing_daemon_is_transient() {
        let errors = [
            LocalApiError::Unreachable {
                socket: "/run/tailscale/tailscaled.sock".into(),
                reason: "connection refused".into(),
            },
            LocalApiError::Timeout {
                call: "GET /localapi/v0/status".into(),
                seconds: 10,
            },
            LocalApiError::NoNetmap {
                call: "GET /localapi/v0/services".into(),
                message: "no netmap".into(),
            },
            LocalApiError::EtagMismatch {
                call: "POST /localapi/v0/serve-config".into(),
            },
            status(500, "cannot start backend when state store is unhealthy"),
        ];
        for error in errors {
            let text = error.to_string();
            assert_eq!(MeshError::from(error).retry(), Retry::Transient, "{text}");
        }
    }

    #[test]
    fn refusals_that_repeat_identically_need_the_operator() {
        let errors = [
            LocalApiError::Forbidden {
                call: "POST /localapi/v0/start".into(),
                message: "access denied".into(),
            },
            LocalApiError::NotFound {
                call: "GET /localapi/v0/serve-config".into(),
                message: "404 page not found".into(),
            },
            status(400, "invalid hostname \"bad_name\""),
        ];
        for error in errors {
            let text = error.to_string();
            let mesh = MeshError::from(error);
            assert_eq!(mesh.retry(), Retry::NeedsOperator, "{text}");
            assert_eq!(mesh.message(), text, "the message is kept");
        }
    }

    #[test]
    fn a_missing_or_rejected_credential_needs_the_operator_and_an_unreachable_control_plane_does_not()
     {
        let config = AuthKeyError::Config("auth_key_env: $TS_KEY is not set".into());
        assert_eq!(MeshError::from(config).retry(), Retry::NeedsOperator);
        let read = AuthKeyError::Read {
            what: "auth_key_file",
            path: "/etc/clawnode/ts.key".into(),
            reason: "No such file or directory".into(),
        };
        assert_eq!(MeshError::from(read).retry(), Retry::NeedsOperator);
        let rejected = AuthKeyError::Exchange {
            step: "token exchange",
            url: "https://controlplane.tailscale.com/api/v2/oauth/token-exchange".into(),
            status: Some(401),
            reason: "HTTP 401 Unauthorized".into(),
        };
        assert_eq!(MeshError::from(rejected).retry(), Retry::NeedsOperator);
        let limited = AuthKeyError::Exchange {
            step: "auth key request",
            url: "https://api.tailscale.com/api/v2/tailnet/-/keys".into(),
            status: Some(429),
            reason: "HTTP 429 Too Many Requests".into(),
        };
        assert_eq!(MeshError::from(limited).retry(), Retry::Transient);
        let unreachable = AuthKeyError::Exchange {
            step: "token exchange",
            url: "http://127.0.0.1:9/api/v2/oauth/token-exchange".into(),
            status: None,
            reason: "connection refused".into(),
        };
        assert_eq!(MeshError::from(unreachable).retry(), Retry::Transient);
    }
}
