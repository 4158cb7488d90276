//! HTTP/1.1 on the client listener, sans-IO.
//!
//! What it is for: parsing request heads and bodies ([`parse`]) and encoding responses
//! ([`response`]); routing and the engine API live beside them. What it must never do: touch
//! a socket, panic on client input, or buffer past the configured head and body limits.

pub mod access;
pub mod parse;
pub mod response;
