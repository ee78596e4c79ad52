"""What transformers / peft models need from the drivers, applied once, in one place."""
