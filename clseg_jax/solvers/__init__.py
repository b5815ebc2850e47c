"""Small on-device solvers used inside the jitted train step (GEM's dual QP in `qp`)."""
