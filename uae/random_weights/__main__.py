from uae.random_weights.cli import main

raise SystemExit(main())
