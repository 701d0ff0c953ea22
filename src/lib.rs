//! clawnode: the Clawbernetes node agent.
//!
//! `core` holds every decision as pure code; the other modules are thin shells around the OS.

pub mod core;
pub mod exit;
