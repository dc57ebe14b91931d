#![no_std]
// Exists so the package has a library target (cargo metadata and host builds).
