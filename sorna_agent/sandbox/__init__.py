"""The kernels' sandbox, as the agent sets it up (docs/kernel-sandbox.md).

`host`: what the host allows and one `Sandbox` (uid, folder, cgroup) per kernel;
`probe`: which namespaces work here; `cgroups`: cgroup v2/v1 per kernel;
`uids`: the agent's uid block; `workdirs`: scratch and kernel folders, uploads;
`rootfs`: the plan of a kernel's root filesystem.  The runner (`runner.py`)
does the part that happens inside the kernel's own processes.
"""
