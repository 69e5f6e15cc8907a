//! The Paddock node agent: pairs with a gateway, keeps an executor WebSocket open, and runs
//! dispatched tasks in a sandbox backend.

pub mod sandbox;
