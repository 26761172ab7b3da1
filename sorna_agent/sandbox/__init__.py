"""The kernels' sandbox, as the agent sets it up: what the host allows (`probe`),
kernel uids (`uids`), and working folders (`workdirs`)."""
