//! Wire formats, one file per protocol. Their serde structs stay private to their
//! file; everything outside sees canonical types.

pub mod openai;
