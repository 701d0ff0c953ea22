//! Process exit codes, shared by every subcommand so that systemd units and scripts can rely on them.

/// Success.
pub const OK: u8 = 0;
/// A runtime failure, or `status --check` reporting "not live/ready".
pub const FAILURE: u8 = 1;
/// EX_CONFIG from sysexits.h: the configuration is invalid. The unit sets
/// `RestartPreventExitStatus=78` so a bad config never restart-loops.
pub const CONFIG: u8 = 78;
