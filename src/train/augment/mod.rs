//! 2. Augmentation: how the views are made.
