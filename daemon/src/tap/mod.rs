//! The tap path: one task or thread per reader, the debouncer that turns detections into
//! taps, the decision from the lists, and the pipeline that records each tap durably.
pub mod debounce;
pub mod decide;
pub mod pipeline;
pub mod readers;
