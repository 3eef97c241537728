//! 4. Losses, one file per loss, its formula and paper in the doc comment.
