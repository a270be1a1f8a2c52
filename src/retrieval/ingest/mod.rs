//! `promptgate ingest`: documents → text → chunks → an index (the local
//! SQLite file, or a Chroma collection), incremental by content hash.
