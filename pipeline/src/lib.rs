//! Pipeline files.
