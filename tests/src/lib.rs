//! End-to-end harness: real vireod, real QEMU guests.
