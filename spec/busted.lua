-- Runs busted inside luahost, so that specs run in a task and may call
-- the so functions directly: luahost spec/busted.lua [busted args] SPEC...
-- (Not on package.path itself: this file's name would shadow busted's.)
package.preload.helper = function() return dofile("spec/helper.lua") end
require "busted.runner" ({ standalone = false })
