//! What node-runner adds to a `vllm serve` command line by itself.

/// vLLM's flag for tensor parallelism, and its short form.
const TENSOR_PARALLEL: [&str; 2] = ["--tensor-parallel-size", "-tp"];

/// Whether `args` set `flag` (or its short form), as `--flag N` or `--flag=N`.
fn sets(args: &[String], flags: &[&str]) -> bool {
    args.iter().any(|arg| {
        flags
            .iter()
            .any(|flag| arg == flag || arg.starts_with(&format!("{flag}=")))
    })
}

/// `--tensor-parallel-size N` for an engine pinned to `gpus` N > 1 GPUs, unless the owner's
/// `args` already say how to split the model: vLLM otherwise loads it on the first GPU alone
/// (and fails when it does not fit there) while the others sit idle.
pub fn tensor_parallel_args(gpus: &[u32], args: &[String]) -> Vec<String> {
    if gpus.len() > 1 && !sets(args, &TENSOR_PARALLEL) {
        vec![TENSOR_PARALLEL[0].to_owned(), gpus.len().to_string()]
    } else {
        Vec::new()
    }
}

/// Whether a process driver's command runs `vllm serve` (the program `vllm`, wherever it is
/// installed): only then does node-runner add vLLM flags to it.
pub fn is_vllm_serve(command: &[String]) -> bool {
    let program = command.first().map(|p| p.rsplit('/').next().unwrap_or(p));
    program == Some("vllm") && command.get(1).is_some_and(|arg| arg == "serve")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn several_gpus_get_tensor_parallelism_unless_the_owner_set_it() {
        assert_eq!(
            tensor_parallel_args(&[0, 1], &[]),
            ["--tensor-parallel-size", "2"]
        );
        assert_eq!(
            tensor_parallel_args(&[0, 1, 2, 3], &strings(&["--max-model-len", "8192"])),
            ["--tensor-parallel-size", "4"]
        );
        assert!(tensor_parallel_args(&[0], &[]).is_empty());
        assert!(tensor_parallel_args(&[], &[]).is_empty());
        for owner in [
            &["--tensor-parallel-size", "1"][..],
            &["-tp", "2"],
            &["--tensor-parallel-size=2"],
            &["-tp=1"],
        ] {
            assert!(
                tensor_parallel_args(&[0, 1], &strings(owner)).is_empty(),
                "{owner:?}"
            );
        }
        // A flag that merely starts the same is not it.
        assert_eq!(
            tensor_parallel_args(&[0, 1], &strings(&["--tensor-parallel-sizes"])).len(),
            2
        );
    }

    #[test]
    fn only_vllm_serve_is_recognised() {
        assert!(is_vllm_serve(&strings(&["vllm", "serve", "m"])));
        assert!(is_vllm_serve(&strings(&["/opt/venv/bin/vllm", "serve"])));
        assert!(!is_vllm_serve(&strings(&["vllm"])));
        assert!(!is_vllm_serve(&strings(&["sim-engine", "serve"])));
        assert!(!is_vllm_serve(&strings(&["python3", "-m", "vllm"])));
        assert!(!is_vllm_serve(&[]));
    }
}
