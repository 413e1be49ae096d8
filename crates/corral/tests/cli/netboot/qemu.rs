//! QEMU firmware tests (filled in below).
