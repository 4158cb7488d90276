//! runner (placeholder; filled in by its owner).
