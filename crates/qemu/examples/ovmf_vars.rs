//! Lists the live variables of an OVMF variable store, decoding Secure Boot key databases.
//!
//! `cargo run -p qemu --example ovmf_vars -- /usr/share/OVMF/OVMF_VARS_4M.ms.fd`
//! `cargo run -p qemu --example ovmf_vars -- --template microsoft-windows [--out VARS.fd]`

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, t, out, dest] = args.as_slice() {
        if flag == "--template" && out == "--out" {
            qemu::prepare_vars(t.parse()?, std::path::Path::new(dest))?;
            return Ok(());
        }
    }
    let image = match args.as_slice() {
        [flag, t] if flag == "--template" => {
            let ovmf = qemu::OvmfPaths::discover()?;
            qemu::firmware::template_vars(&ovmf, t.parse()?)?
        }
        [path] => std::fs::read(path)?,
        _ => return Err("usage: ovmf_vars VARS.fd | --template NAME [--out DEST]".into()),
    };
    for v in qemu::firmware::list_variables(image)? {
        println!(
            "{:<24} {} attr={:#04x} size={}",
            v.name, v.vendor, v.attributes, v.size
        );
        for e in v.entries {
            println!("    {e}");
        }
    }
    Ok(())
}
