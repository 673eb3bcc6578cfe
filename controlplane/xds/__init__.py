"""xDS: the desired state as Envoy configuration, served over ADS."""
