//! A tiny x86-64 machine-code builder for test and benchmark guests.
//!
//! Guests built with it run in 64-bit mode from [`crate::memory::HIMEM_START`]
//! on the GDT and identity page tables set up by [`crate::x86_64::regs`].
//! Only the handful of instructions our tiny guests need are encoded; the
//! encodings are from the Intel SDM, volume 2.

/// An x86-64 code buffer with labels for backward jumps.
#[derive(Debug, Default, Clone)]
pub struct Asm {
    code: Vec<u8>,
}

impl Asm {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The machine code.
    pub fn finish(self) -> Vec<u8> {
        self.code
    }

    /// Current offset (a label for [`Asm::jnz`] / [`Asm::jmp`]).
    pub fn here(&self) -> usize {
        self.code.len()
    }

    fn bytes(mut self, b: &[u8]) -> Self {
        self.code.extend_from_slice(b);
        self
    }

    /// `mov dx, imm16`
    pub fn mov_dx(self, v: u16) -> Self {
        let [a, b] = v.to_le_bytes();
        self.bytes(&[0x66, 0xba, a, b])
    }

    /// `mov al, imm8`
    pub fn mov_al(self, v: u8) -> Self {
        self.bytes(&[0xb0, v])
    }

    /// `mov ecx, imm32`
    pub fn mov_ecx(self, v: u32) -> Self {
        let mut s = self.bytes(&[0xb9]);
        s.code.extend_from_slice(&v.to_le_bytes());
        s
    }

    /// `mov rax, imm64`
    pub fn mov_rax(self, v: u64) -> Self {
        let mut s = self.bytes(&[0x48, 0xb8]);
        s.code.extend_from_slice(&v.to_le_bytes());
        s
    }

    /// `mov dword [rax], imm32`
    pub fn store32_at_rax(self, v: u32) -> Self {
        let mut s = self.bytes(&[0xc7, 0x00]);
        s.code.extend_from_slice(&v.to_le_bytes());
        s
    }

    /// `mov rax, addr; mov dword [rax], v`: a 32-bit MMIO (or memory) write.
    pub fn write32(self, addr: u64, v: u32) -> Self {
        self.mov_rax(addr).store32_at_rax(v)
    }

    /// `mov eax, dword [rax]`
    pub fn load32_from_rax(self) -> Self {
        self.bytes(&[0x8b, 0x00])
    }

    /// `out dx, al`
    pub fn out_dx_al(self) -> Self {
        self.bytes(&[0xee])
    }

    /// `in al, dx`
    pub fn in_al_dx(self) -> Self {
        self.bytes(&[0xec])
    }

    /// `out imm8, al`
    pub fn out_imm_al(self, port: u8) -> Self {
        self.bytes(&[0xe6, port])
    }

    /// Writes `s` to the port in `port` byte by byte.
    pub fn print(mut self, port: u16, s: &[u8]) -> Self {
        self = self.mov_dx(port);
        for &c in s {
            self = self.mov_al(c).out_dx_al();
        }
        self
    }

    /// `dec ecx`
    pub fn dec_ecx(self) -> Self {
        self.bytes(&[0xff, 0xc9])
    }

    /// `jnz label` (short, backward or forward within ±127 bytes).
    pub fn jnz(self, label: usize) -> Self {
        let rel = label as isize - (self.code.len() as isize + 2);
        self.bytes(&[0x75, rel as i8 as u8])
    }

    /// `jz label` (short).
    pub fn jz(self, label: usize) -> Self {
        let rel = label as isize - (self.code.len() as isize + 2);
        self.bytes(&[0x74, rel as i8 as u8])
    }

    /// `test al, imm8`
    pub fn test_al(self, v: u8) -> Self {
        self.bytes(&[0xa8, v])
    }

    /// `cmp al, imm8`
    pub fn cmp_al(self, v: u8) -> Self {
        self.bytes(&[0x3c, v])
    }

    /// `jmp label` (short).
    pub fn jmp(self, label: usize) -> Self {
        let rel = label as isize - (self.code.len() as isize + 2);
        self.bytes(&[0xeb, rel as i8 as u8])
    }

    /// `jmp $`: spin forever.
    pub fn spin(self) -> Self {
        self.bytes(&[0xeb, 0xfe])
    }

    /// `hlt`
    pub fn hlt(self) -> Self {
        self.bytes(&[0xf4])
    }

    /// `cli`
    pub fn cli(self) -> Self {
        self.bytes(&[0xfa])
    }

    /// `sti`
    pub fn sti(self) -> Self {
        self.bytes(&[0xfb])
    }

    /// `lidt [rax]`
    pub fn lidt_at_rax(self) -> Self {
        self.bytes(&[0x0f, 0x01, 0x18])
    }

    /// `ud2`: raises #UD.
    pub fn ud2(self) -> Self {
        self.bytes(&[0x0f, 0x0b])
    }

    /// `out 0x64, 0xFE` via al: the i8042 reset command.
    pub fn i8042_reset(self) -> Self {
        self.mov_al(0xfe).out_imm_al(0x64)
    }

    /// `xor ebx, ebx`
    pub fn zero_ebx(self) -> Self {
        self.bytes(&[0x31, 0xdb])
    }

    /// `add rbx, rcx`
    pub fn add_rbx_rcx(self) -> Self {
        self.bytes(&[0x48, 0x01, 0xcb])
    }

    /// `mov eax, ecx`
    pub fn mov_eax_ecx(self) -> Self {
        self.bytes(&[0x89, 0xc8])
    }

    /// `mov eax, ebx`
    pub fn mov_eax_ebx(self) -> Self {
        self.bytes(&[0x89, 0xd8])
    }

    /// `out dx, eax`
    pub fn out_dx_eax(self) -> Self {
        self.bytes(&[0xef])
    }

    /// `mov rax, qword [rax]`
    pub fn load64_from_rax(self) -> Self {
        self.bytes(&[0x48, 0x8b, 0x00])
    }

    /// `mov rdi, imm64`
    pub fn mov_rdi(self, v: u64) -> Self {
        let mut s = self.bytes(&[0x48, 0xbf]);
        s.code.extend_from_slice(&v.to_le_bytes());
        s
    }

    /// `mov qword [rdi + disp], rax`
    pub fn store_rax_at_rdi(self, disp: i8) -> Self {
        self.bytes(&[0x48, 0x89, 0x47, disp as u8])
    }

    /// `mov qword [rdi + disp], rbx`
    pub fn store_rbx_at_rdi(self, disp: i8) -> Self {
        self.bytes(&[0x48, 0x89, 0x5f, disp as u8])
    }

    /// Raw bytes.
    pub fn raw(self, b: &[u8]) -> Self {
        self.bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_sequences() {
        let code = Asm::new().mov_dx(0x3f8).mov_al(b'O').out_dx_al().finish();
        assert_eq!(code, [0x66, 0xba, 0xf8, 0x03, 0xb0, b'O', 0xee]);
        assert_eq!(Asm::new().spin().finish(), [0xeb, 0xfe]);
        assert_eq!(Asm::new().i8042_reset().finish(), [0xb0, 0xfe, 0xe6, 0x64]);
    }

    #[test]
    fn encodes_the_snapshot_guest_instructions() {
        let code = Asm::new()
            .zero_ebx()
            .add_rbx_rcx()
            .mov_eax_ecx()
            .out_dx_eax()
            .load64_from_rax()
            .store_rax_at_rdi(0)
            .store_rbx_at_rdi(8)
            .finish();
        assert_eq!(
            code,
            [
                0x31, 0xdb, 0x48, 0x01, 0xcb, 0x89, 0xc8, 0xef, 0x48, 0x8b, 0x00, 0x48, 0x89, 0x47,
                0x00, 0x48, 0x89, 0x5f, 0x08
            ]
        );
    }

    #[test]
    fn backward_jump_targets_the_label() {
        let a = Asm::new().mov_ecx(3);
        let top = a.here();
        let code = a.dec_ecx().jnz(top).finish();
        // dec ecx (2 bytes) + jnz (2 bytes) back to offset 5: rel = 5 - 9 = -4.
        assert_eq!(&code[5..], &[0xff, 0xc9, 0x75, 0xfc]);
    }
}
