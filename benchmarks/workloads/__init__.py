"""The benchmark's workloads, one module each (W1–W7); each builds :class:`harness.Case`\\ s."""
