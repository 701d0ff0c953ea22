//! Service advertisement and discovery over the mesh: the node-info endpoint each node serves
//! on its mesh address, and the client that fans out to every peer's endpoint.

pub mod discover;
pub mod health;
pub mod node_info;
