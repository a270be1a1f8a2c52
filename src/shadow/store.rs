//! (being written: placeholder so the dispatch compiles)
use super::Pair;
pub struct Writer;
impl Writer {
    pub fn open(_path: &std::path::Path) -> Writer {
        Writer
    }
    pub fn try_send(&self, _pair: Pair) -> bool {
        true
    }
    pub fn close(&self, _within: std::time::Duration) {}
}
