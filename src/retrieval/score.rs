//! The one score scale users see: a similarity in [0, 1], higher is better.
//! Each branch's raw score is mapped onto it here, and nowhere else.
