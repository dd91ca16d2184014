from uae.apps.build_checkpoint import main

raise SystemExit(main())
