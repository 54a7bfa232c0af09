"""Adapters at the edge, one per real system (S3, AMQP, libvirt, qemu-img, LVM)."""
